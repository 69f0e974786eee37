#!/usr/bin/env bash
# The GPU path on one lent GPU, in one prepared run that fits in 8 minutes (issue 16, item 8):
# inventory and datasheet peak, multi-rank correctness on CUDA tensors (4 ranks sharing the GPU
# over gloo, every plan vs the reference engine, MoE ep 2, a checkpoint resumed on 2 ranks),
# NCCL list vs single-tensor collectives, MFU of a ~1B dense model beside fair FSDP2, and the
# checkpoint stall. Writes runs/gpu-validate/summary.json (and prints it); exit 1 if a section
# failed. On a machine without a GPU it dry-runs what it can on CPU.
#   bash benchmarks/gpu_validate.sh
#   PYTHON=/opt/venv/bin/python bash benchmarks/gpu_validate.sh --only a b
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
if ! "$PY" -c "import tierzero" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[test]" >/dev/null   # a bare machine: the package and its test extra
fi
timeout --signal=INT 470 "$PY" benchmarks/gpu_validate.py --out runs/gpu-validate/summary.json "$@"
