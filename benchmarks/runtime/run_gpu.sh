#!/bin/bash
# One device call: the GPU tests of the attention / fused kernels and the runtime, then the whole runtime benchmark.
# Everything lands under $OUT (at most 6 files). Usage, from the repository root (or a carried copy of the worktree,
# with .whl carried for diffusers and sageattention):  BUDGET=420 bash benchmarks/runtime/run_gpu.sh
# SKIP_TESTS=1 skips the tests (a second call for the sections the first one's budget skipped, via BENCH_ARGS);
# GLUON_TESTS=1 with it still runs the Gluon kernels' tests, which the benchmark's "gluon" section needs.
# LINEARS=1: also the per-linear GEMM benchmark with the Gluon K loop (benchmarks/kernels/bench_linears.py --gluon,
# Wan-14B and Wan-1.3B shapes at 32,760 tokens), before the runtime benchmark; its files come back as linears.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if ls .whl/diffusers-*.whl >/dev/null 2>&1 && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/diffusers-*.whl .whl/importlib_metadata-*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/kernels
if [ -f .cache/triton_cache.tgz ]; then mkdir -p ~/.triton && tar xzf .cache/triton_cache.tgz -C ~/.triton; fi
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee $OUT/env.txt

# The Gluon kernels first (attention, then GEMM), each alone under its own limit: they have never run on a GPU, and
# a wrong barrier phase hangs. The benchmark's "gluon" section runs only if the attention's passed, its Gluon-GEMM
# column only if the GEMM's passed too.
# The benchmark's "gluon" section (its sweep rows and whole-model column, run last) only runs if this passed.
PYTEST="python3 -m pytest --noconftest -p no:cacheprovider -q -rs -W ignore::pytest.PytestUnknownMarkWarning"
GLUON_SKIP="--skip-sections gluon"
if [ -z "${SKIP_TESTS:-}" ] || [ -n "${GLUON_TESTS:-}" ]; then
  timeout ${GLUON_TEST_TIMEOUT:-220} $PYTEST tests/test_attention_triton.py -k "gluon and gpu" 2>&1 \
    | tee $OUT/gluon_tests.txt | tail -4
  [ "${PIPESTATUS[0]}" = "0" ] && grep -q " passed" $OUT/gluon_tests.txt && GLUON_SKIP=""
  timeout ${GLUON_GEMM_TEST_TIMEOUT:-150} $PYTEST tests/test_kernels_gemm_gluon.py -k hopper 2>&1 \
    | tee -a $OUT/gluon_tests.txt | tail -4
  [ "${PIPESTATUS[0]}" = "0" ] || GLUON_SKIP="$GLUON_SKIP --skip-gluon-gemm"
fi
[ -z "${SKIP_TESTS:-}" ] && timeout ${TEST_TIMEOUT:-170} $PYTEST -k "not gluon" \
  tests/test_attention_triton.py tests/test_kernels_fused.py tests/test_runtime_attention.py 2>&1 | tee $OUT/gpu_tests.txt | tail -6

# sageattention 1.0.6 (PyPI, Triton only) for the "diffusers + SageAttention" columns: installed after the tests,
# into a folder of its own, so nothing else runs with it importable
if ls .whl/sageattention-*.whl >/dev/null 2>&1 && ! python3 -c "import sageattention" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sage \
    .whl/sageattention-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/sage
fi
python3 -c "import importlib.metadata as m; print('sageattention', m.version('sageattention'))" 2>&1 | tail -1 >> $OUT/env.txt

if [ -n "${LINEARS:-}" ]; then
  mkdir -p /tmp/linears && timeout ${LINEARS_TIMEOUT:-200} python3 benchmarks/kernels/bench_linears.py --out /tmp/linears \
    --models wan14b,wan1.3b --tokens 32760 --gluon --budget-s ${LINEARS_BUDGET:-150} 2>&1 | tail -12
  tar czf $OUT/linears.tgz -C /tmp linears
fi

# the lent GPU stops a command at 600 s: the benchmark gets what is left of CALL_LIMIT after the tests
rest=$(( ${CALL_LIMIT:-570} - SECONDS )); budget=${BUDGET:-420}; [ $budget -gt $(( rest - 30 )) ] && budget=$(( rest - 30 ))
timeout ${BENCH_TIMEOUT:-$rest} python3 benchmarks/runtime/bench_runtime.py --out $OUT --budget-s $budget \
  $GLUON_SKIP ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench_stdout.txt | tail -30
tar czf $OUT/triton_cache.tgz -C ~/.triton cache 2>/dev/null
echo "total ${SECONDS}s"
