#!/usr/bin/env bash
# Four H200s in one call (device time is scarce): phase 1 runs three jobs side by side on separate GPUs,
# phase 2 uses all four. Results land in $OUT/*.json and the log; a table is printed last.
#   bash benchmarks/training/gpu_multi.sh [WAN14B_LAYERS]
. benchmarks/training/device_env.sh
OUT=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p $OUT $W
L14=${1:-12}
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee $OUT/gpus.txt
W13="--data.synthetic_latent_size 13,60,104 --data.synthetic_samples 8 --data.synthetic_samples_per_shard 2 --data.num_workers 1 --data.synthesize_if_missing true --data.shards $W/w13"
# the synthetic set once, before the jobs that share it start
python3 -c "
from megatron_qvgen.recipes import get_recipe; from megatron_qvgen.config import apply_overrides, parse_override_args
from megatron_qvgen.data import ensure_synthetic_dataset
import sys; cfg = apply_overrides(get_recipe('wan_1_3b'), parse_override_args(sys.argv[1:]))
ensure_synthetic_dataset(cfg.data, 16, 512, 4096)" $W13 > $OUT/synth.log 2>&1
echo "== phase 1: 1 GPU QAT vs bf16 | TP=2 then PP=2"
CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc-per-node 1 benchmarks/training/bench_distill.py --recipe wan_1_3b \
  --steps 5 --warmup 2 --compare-bf16 --json $OUT/wan13b_1gpu.json $W13 --train.global_batch_size 1 --train.steps 60 > $OUT/wan13b_1gpu.log 2>&1 &
P0=$!
( CUDA_VISIBLE_DEVICES=1,2 torchrun --standalone --nproc-per-node 2 benchmarks/training/bench_distill.py --recipe wan_1_3b \
    --steps 5 --warmup 2 --json $OUT/wan13b_tp2.json $W13 --parallel.tensor_parallel 2 --parallel.sequence_parallel true \
    --train.global_batch_size 1 --train.steps 60 > $OUT/wan13b_tp2.log 2>&1
  CUDA_VISIBLE_DEVICES=1,2 torchrun --standalone --nproc-per-node 2 benchmarks/training/bench_distill.py --recipe wan_1_3b \
    --steps 5 --warmup 2 --json $OUT/wan13b_pp2.json $W13 --parallel.pipeline_parallel 2 \
    --train.global_batch_size 2 --train.steps 60 > $OUT/wan13b_pp2.log 2>&1 ) &
P12=$!
wait $P0 $P12
echo "== phase 2: Wan-14B width at TP=4 (SP, recompute, distributed optimizer), $L14 layers, 20 steps"
torchrun --standalone --nproc-per-node 4 benchmarks/training/bench_distill.py --recipe wan_14b --steps 20 --warmup 3 \
  --json $OUT/wan14b_tp4.json --parallel.tensor_parallel 4 --model.num_layers $L14 --quant.decay_phase_steps 8 \
  --train.global_batch_size 1 --train.steps 60 --data.synthetic_latent_size 21,60,104 --data.synthetic_samples 4 \
  --data.synthetic_samples_per_shard 2 --data.num_workers 1 --data.synthesize_if_missing true --data.shards $W/w14 > $OUT/wan14b_tp4.log 2>&1
echo "== phase 3: Wan-1.3B real config, ours vs diffusers at TP=1 and TP=2 (NCCL)"
CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc-per-node 2 benchmarks/model_parity/wan_gpu_parity.py \
  --json $OUT/wan_parity.json > $OUT/parity.log 2>&1
echo "== results"
tail -n 2 $OUT/*.log | grep -E "==>|world=|TP=|max" | cut -c1-400
