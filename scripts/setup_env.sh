#!/usr/bin/env bash
# Creates .venv (if missing) and installs megatron-qvgen with its test extras: current releases of everything
# (setup.py has no upper bounds), except the two pins below, each for the reason given.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch==2.13.0: the CPU build this machine's pip finds locally; unpinned, pip would fetch a multi-GB CUDA build.
#   It is named in the same command as everything that needs torch, so nothing pulls another torch.
# triton==3.6.0: the version on the GPU image (so CPU tests under TRITON_INTERPRET=1 run the Triton the kernels
#   are tuned with); megatron-core 0.18+ and the kernels need triton, any 3.x works for them.
python -m pip install -q "torch==2.13.0" "triton==3.6.0" -e ".[test]"
