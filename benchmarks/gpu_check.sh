#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), bounded to 5 minutes: CUDA against CPU `sync`,
# and daskdist against a plain single-GPU torch loop. Needs a CUDA build of torch and
# daskdist installed in $PYTHON's environment (default: .venv/bin/python, else python3);
# for example: pip install torch (a CUDA build), then `make setup TORCH_CONSTRAINT=`.
# Extra arguments go to the script (--device cuda:1, --samples ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec timeout 300 "$PYTHON" benchmarks/gpu_check.py "$@"
