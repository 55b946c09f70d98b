#!/usr/bin/env bash
# megatron-core 0.19.x on the GPU image (Python 3.12): the CPU-path distributed tests with CUDA hidden (so the CPU
# shim applies) and a short tiny_wan trainer run on the GPU, both against the carried 0.19 wheel.
# Usage on the device, from this repo's root: bash benchmarks/training/gpu_mcore19.sh WHEELS19_DIR WHEELS_DIR
#   WHEELS19_DIR holds megatron_core-0.19.*.whl; WHEELS_DIR diffusers, importlib_metadata, braceexpand, webdataset.
# Writes $OUT/mcore19_tests.log, $OUT/mcore19_train.log and prints a two-line summary.
set -uo pipefail
W19=$1; W=$2; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site19 \
  "$W19"/megatron_core-0.19*.whl "$W"/diffusers-*.whl "$W"/importlib_metadata-*.whl "$W"/braceexpand-*.whl \
  "$W"/webdataset-*.whl || exit 1
export PYTHONPATH=/tmp/site19:$PWD:$PWD/kernels PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 QVGEN_FUSED_AUTOTUNE=0
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -W ignore -c "import sys, torch, triton, megatron.core as m
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'megatron-core',
      m.__version__)" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$OUT/versions.txt"
# the GPU run in the background while the CPU tests use the cores
( torchrun --standalone --nproc-per-node 1 -m megatron_qvgen.train --recipe tiny_wan --data.shards /tmp/d \
    --data.synthesize_if_missing true --train.precision bf16 --train.steps 14 --train.log_interval 7 \
    --train.save_dir /tmp/r > "$OUT/mcore19_train.log" 2>&1; echo "train exit $?" >> "$OUT/mcore19_train.log" ) &
CUDA_VISIBLE_DEVICES= timeout 420 python3 -m pytest -q -x -p no:cacheprovider tests/test_cpu_shim.py \
  tests/test_trainer.py tests/test_quant_linear_tp.py tests/test_models_wan.py tests/test_entry_points.py \
  > "$OUT/mcore19_tests.log" 2>&1
echo "tests exit $?" >> "$OUT/mcore19_tests.log"
wait
echo "CPU path (CUDA hidden): $(grep -E 'passed|failed|error' "$OUT/mcore19_tests.log" | tail -1) | $(tail -1 "$OUT/mcore19_tests.log")"
echo "GPU tiny_wan: $(grep '^step ' "$OUT/mcore19_train.log" | tail -1 | cut -c1-120) | $(tail -1 "$OUT/mcore19_train.log")"
