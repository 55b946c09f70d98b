# Sourced at the start of a device run: carried wheels (megatron-core, diffusers) into /tmp/site and our two
# import packages on PYTHONPATH (qvgen_kernels lives in kernels/qvgen_kernels/). The GPU image has torch/triton.
set -e
command -v python >/dev/null || ln -sf "$(command -v python3)" /usr/local/bin/python   # the image has python3 only
# megatron-core is required; the others are installed when carried (the fidelity study needs no diffusers, and
# leaving its 6 MB wheel behind keeps the study's carry, with the 51 MB teacher pack, under the 64 MiB a call takes)
ls .whl/megatron_core-*.whl >/dev/null || { echo "device_env.sh: carry .whl/megatron_core-*.whl" >&2; return 1 2>/dev/null || exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/megatron_core-*.whl .whl/diffusers-*.whl .whl/importlib_metadata-*.whl .whl/braceexpand-*.whl 2>/dev/null)
export PYTHONPATH=/tmp/site:$PWD/kernels:$PWD
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 QVGEN_FUSED_AUTOTUNE=0  # fixed kernel configs: no autotuning minutes in a short lease
set +e
