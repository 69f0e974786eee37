#!/usr/bin/env bash
# The GPU path on one lent GPU, in one prepared run that fits in 8 minutes (issue 16 item 8, issue 25
# item 7): a inventory and datasheet peak, b multi-rank correctness on CUDA tensors (4 ranks sharing the
# GPU over gloo), c NCCL list vs single-tensor collectives, d the A/B of the native engine against FSDP2
# with per-block compile (per-phase CUDA-event times at micro-batch 2 and 4, each run twice; the native
# toggles; a step at accumulation 8; a profiled step's top kernels and SDPA backend), e the checkpoint
# stall of saves 1, 2 and 3 against a synchronous save. Writes runs/gpu-validate/summary.json and
# summary.md (the table, also printed); exit 1 if a section failed. Without a GPU it dry-runs every path
# on CPU at tiny sizes.
#   bash benchmarks/gpu_validate.sh
#   PYTHON=/opt/venv/bin/python bash benchmarks/gpu_validate.sh --only a d
#
# What the machine needs: torch (a CUDA build; train.compile needs only the triton that ships with it)
# and tierzero's dependencies. The lent H100/H200 image has all of them but omegaconf, and no package
# index: carry the missing wheels in .whl/ (git-ignored), installed here with --no-index:
#   omegaconf 2.4.x (py3-none-any; it vendors the antlr4 runtime), or omegaconf 2.3.0 together with
#   antlr4-python3-runtime 4.9.3 (an sdist: build its wheel where pip works, `pip wheel --no-deps`).
# tierzero itself runs from this tree (linked as the `tierzero` namespace package, first on the path):
# no tierzero wheel is needed, and a carried one is not installed, so the code measured is the tree's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
SITE=${TZ_SITE:-/tmp/tz-site}
if ! "$PY" -c "import omegaconf" 2>/dev/null; then
  WHEELS=$(ls .whl/*.whl 2>/dev/null | grep -v '/tierzero-' || true)
  if [ -n "$WHEELS" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE/deps" $WHEELS || exit 2
    export PYTHONPATH="$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
  else  # a machine with a package index: tierzero's dependencies (the torch already there is kept)
    "$PY" -m pip install -q -e . >/dev/null || exit 2
  fi
fi
mkdir -p "$SITE/tree" && ln -sfn "$PWD" "$SITE/tree/tierzero"
export PYTHONPATH="$SITE/tree${PYTHONPATH:+:$PYTHONPATH}"
# SIGINT at 470 s (the script's own budget is 440 s; it writes what it has and exits), SIGKILL 20 s later
timeout --signal=INT --kill-after=20 470 "$PY" benchmarks/gpu_validate.py --out runs/gpu-validate/summary.json "$@"
