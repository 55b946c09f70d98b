#!/bin/bash
# One device call: GPU tests, per-linear benchmarks, a short Nsight Compute profile. Everything under $OUT.
# Usage (device tool, repo root): BUDGET=300 bash benchmarks/kernels/run_h100.sh
set -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/kernels:$PWD
if [ -f .cache/triton_cache.tgz ]; then mkdir -p ~/.triton && tar xzf .cache/triton_cache.tgz -C ~/.triton; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee $OUT/env.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/env.txt

timeout ${TEST_TIMEOUT:-150} python3 -m pytest --noconftest -p no:cacheprovider -q -x \
  tests/test_kernels_act_quant.py tests/test_kernels_gemm.py tests/test_runtime_linear.py 2>&1 | tee $OUT/gpu_tests.txt | tail -4

python3 benchmarks/kernels/bench_linears.py --out $OUT ${BENCH_ARGS:---sweep} --budget-s ${BUDGET:-300} 2>&1 \
  | tee $OUT/bench_stdout.txt | tail -22

if [ -z "$SKIP_WAN" ]; then
  timeout ${WAN_TIMEOUT:-150} python3 benchmarks/kernels/bench_wan.py --out $OUT > $OUT/wan_stdout.txt 2>&1
  python3 -c "import json; d=json.load(open('$OUT/wan_results.json')); [print(k, {a: b for a, b in v.items() if 'bytes' not in a} if isinstance(v, dict) else v) for k, v in d.items()]"
fi

if [ $SECONDS -lt ${PROFILE_BEFORE_S:-400} ] && command -v ncu >/dev/null; then
  timeout 60 ncu -k regex:"_gemm|_act_quant" -c 2 --section SpeedOfLight --section Occupancy --section LaunchStats \
    python3 benchmarks/kernels/profile_one.py --M 32760 --K ${PROFILE_K:-5120} --N ${PROFILE_N:-5120} --variant ${PROFILE_VARIANT:-tma} \
    > $OUT/ncu.txt 2>&1; grep -E "^  [a-z_]+|Duration|Throughput|Registers|Achieved Occupancy" $OUT/ncu.txt | head -24
fi
tar czf $OUT/triton_cache.tgz -C ~/.triton cache 2>/dev/null
echo "total ${SECONDS}s"
