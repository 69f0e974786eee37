#!/usr/bin/env bash
# GPU path smoke test (cannot run on the CPU-only dev machines): nccl backend, one rank
# per GPU, a few training steps, NVML node telemetry. Run on a machine with CUDA GPUs:
#   bash benchmarks/gpu_smoke.sh            # all visible GPUs (or 1)
# Prints the topology, the run's tail, and the NVML rows it recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
RUN=runs/gpu-smoke
rm -rf "$RUN"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python -m launcher.cli topo launcher.nproc="$NGPU"
python -m launcher.cli run run.name=gpu-smoke launcher.nproc="$NGPU" launcher.backend=nccl \
    train.steps=30 train.dtype=bfloat16 train.global_batch_size=$((8 * NGPU)) train.micro_batch_size=8 \
    telemetry.flush_every_s=2 telemetry.node_sample_every_s=1 train.log_every=5
python -m launcher.cli report "$RUN"
python - <<'PY'
import pyarrow.dataset as ds
t = ds.dataset("runs/gpu-smoke/telemetry/nodes", format="parquet", partitioning="hive").to_table()
rows = [r for r in t.to_pylist() if r["gpu_index"] is not None]
print(f"NVML rows: {len(rows)}")
for r in rows[:4]:
    print({k: r[k] for k in ("host", "gpu_index", "gpu_util_percent", "gpu_mem_used_bytes", "gpu_power_w", "gpu_temp_c")})
assert rows, "no GPU rows in the nodes table: NVML sampling did not work"
PY
