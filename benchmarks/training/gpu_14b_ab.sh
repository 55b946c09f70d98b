#!/usr/bin/env bash
# Wan-14B width at TP=4: the same 12 steps with the fused fake-quant kernels and with the torch reference path.
. benchmarks/training/device_env.sh
OUT=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p $OUT $W
ARGS="--recipe wan_14b --steps 12 --warmup 3 --parallel.tensor_parallel 4 --model.num_layers 8 --quant.decay_phase_steps 4 \
  --train.global_batch_size 1 --train.steps 60 --data.synthetic_latent_size 21,60,104 --data.synthetic_samples 4 \
  --data.synthetic_samples_per_shard 2 --data.num_workers 1 --data.synthesize_if_missing true --data.shards $W/w14"
for mode in fused reference; do
  QVGEN_FAKE_QUANT=$mode torchrun --standalone --nproc-per-node 4 benchmarks/training/bench_distill.py $ARGS \
    --json $OUT/wan14b_tp4_$mode.json > $OUT/wan14b_tp4_$mode.log 2>&1
  echo "$mode: $(grep 'world=' $OUT/wan14b_tp4_$mode.log | cut -c1-600)"
done
