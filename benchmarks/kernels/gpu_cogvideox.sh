#!/usr/bin/env bash
# One GPU: CogVideoX-2B real config, our megatron model vs diffusers (TP=1), and the W4A4 runtime forward vs bf16.
. benchmarks/training/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 torchrun --standalone --nproc-per-node 1 benchmarks/model_parity/wan_gpu_parity.py --recipe cogvideox_2b --tp 1 \
  --workdir /tmp/cog2b --latent-frames 13 --latent-height 30 --latent-width 45 --json $OUT/cogvideox2b_parity.json \
  > $OUT/cogvideox2b_parity.log 2>&1
python3 -c "import json; d=json.load(open('$OUT/cogvideox2b_parity.json')); [print('parity', r['tp'], r['dtype'], r['max_abs'], r['max_rel']) for r in d['results']]"
timeout 150 python3 benchmarks/kernels/bench_cogvideox.py --out $OUT --models 2b > $OUT/cogvideox_bench.log 2>&1
tail -n 12 $OUT/cogvideox_bench.log
