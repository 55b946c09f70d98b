#!/usr/bin/env bash
# Creates .venv (if missing) and installs megatron-qvgen with its test extras, CPU torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.13.0" "triton==3.6.0" -e ".[test]"
