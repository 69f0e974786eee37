#!/usr/bin/env bash
# GPU path smoke test (cannot run on the CPU-only dev machines): nccl backend, one rank
# per GPU, a few training steps in bf16, NVML node telemetry, and the stop-signal drill
# (SIGUSR2 -> finish the step, checkpoint, exit 75; the next launch resumes). Run on a
# machine with CUDA GPUs, from anywhere:
#   bash benchmarks/gpu_smoke.sh            # all visible GPUs (or 1)
#   PYTHON=/opt/venv/bin/python bash benchmarks/gpu_smoke.sh
# Prints the topology, the run's tail, the NVML rows it recorded and the drill's outcome.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
NGPU=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
RUN=runs/gpu-smoke
rm -rf "$RUN" runs/gpu-signal
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"
"$PY" -m tierzero.launcher.cli topo launcher.nproc="$NGPU"
"$PY" -m tierzero.launcher.cli run run.name=gpu-smoke launcher.nproc="$NGPU" launcher.backend=nccl parallel.ep=1 \
    train.steps=30 train.dtype=bfloat16 train.global_batch_size=$((8 * NGPU)) train.micro_batch_size=8 \
    telemetry.flush_every_s=2 telemetry.node_sample_every_s=1 train.log_every=5
"$PY" -m tierzero.launcher.cli report "$RUN"
"$PY" - <<'PY'
import pyarrow.dataset as ds
t = ds.dataset("runs/gpu-smoke/telemetry/nodes", format="parquet", partitioning="hive").to_table()
rows = [r for r in t.to_pylist() if r["gpu_index"] is not None]
print(f"NVML rows: {len(rows)}")
for r in rows[:4]:
    print({k: r[k] for k in ("host", "gpu_index", "gpu_util_percent", "gpu_mem_used_bytes", "gpu_power_w", "gpu_temp_c")})
assert rows, "no GPU rows in the nodes table: NVML sampling did not work"
PY

echo "== stop-signal drill: SIGUSR2 at step >= 20 of 3000, then resume =="
ARGS=(run.name=gpu-signal launcher.nproc="$NGPU" launcher.backend=nccl parallel.ep=1 train.dtype=bfloat16 train.steps=3000
      train.global_batch_size=$((8 * NGPU)) train.micro_batch_size=8 train.log_every=500)
"$PY" -m tierzero.launcher.cli run "${ARGS[@]}" > runs/gpu-signal.log 2>&1 &
SUP=$!
for _ in $(seq 1 600); do
  STEP=$("$PY" -c "import json; print(json.load(open('runs/gpu-signal/.heartbeat/rank-0.json'))['step'])" 2>/dev/null || echo 0)
  [ "$STEP" -ge 20 ] && break
  sleep 0.2
done
kill -USR2 "$SUP"
set +e; wait "$SUP"; RC=$?; set -e
tail -3 runs/gpu-signal.log
echo "exit code after SIGUSR2: $RC (75 expected)"
[ "$RC" -eq 75 ]
"$PY" -m tierzero.launcher.cli ckpt list runs/gpu-signal/checkpoints
"$PY" -m tierzero.launcher.cli run "${ARGS[@]}" 2>&1 | grep -E "resumed|done:|finished" || true
"$PY" -m tierzero.launcher.cli report runs/gpu-signal | grep -A2 "stopped by a signal"
