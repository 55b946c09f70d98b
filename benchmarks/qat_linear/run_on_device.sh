#!/usr/bin/env bash
# One device call: GPU tests of the fused fake quantisers (one block config each), then the benchmark (autotuned).
# Run from the repository root on the GPU machine with .whl/ carried (megatron-core, and pytest if absent).
set -o pipefail
OUT=${OUT:-/tmp/qat_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/megatron_core-*.whl || exit 1
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
QVGEN_FUSED_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-120}" python3 -m pytest tests/test_fused_fake_quant.py -m gpu -q --maxfail=5 -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-285}" python3 benchmarks/qat_linear/bench_qat_linear.py --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/bench.log" | grep -v '^ \|^{\|^}' | tail -40
