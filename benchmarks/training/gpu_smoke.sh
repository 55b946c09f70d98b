#!/usr/bin/env bash
# One GPU: the trainer end to end on CUDA (tiny recipe, through rank 0 and a checkpoint/resume), then a short
# Wan-1.3B-width timing. Usage on the device: bash benchmarks/training/gpu_smoke.sh  (writes under $OUT)
. benchmarks/training/device_env.sh
OUT=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p $OUT $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, megatron.core, diffusers, qvgen_kernels, megatron_qvgen; print('imports ok', torch.__version__, megatron.core.__version__)"
echo "== tiny_wan on 1 GPU (bf16), 12 steps, save + resume"
torchrun --standalone --nproc-per-node 1 -m megatron_qvgen.train --recipe tiny_wan --data.shards $W/tiny --data.synthesize_if_missing true \
  --train.precision bf16 --train.steps 12 --train.save_interval 6 --train.save_dir $W/ckpt --train.log_interval 4 2>&1 | grep -E "step |Error|error" | tail -8
torchrun --standalone --nproc-per-node 1 -m megatron_qvgen.train --recipe tiny_wan --data.shards $W/tiny \
  --train.precision bf16 --train.steps 16 --train.save_dir $W/ckpt --train.log_interval 4 2>&1 | grep -E "step |Error|error" | tail -4
echo "== Wan-1.3B width, 6 layers, 480p 49 frames (20280 tokens), QAT vs bf16 student"
torchrun --standalone --nproc-per-node 1 benchmarks/training/bench_distill.py --recipe wan_1_3b --steps 5 --warmup 2 --compare-bf16 \
  --json $OUT/wan13b_6l_1gpu.json --model.num_layers 6 --data.shards $W/w13 --data.synthesize_if_missing true \
  --data.synthetic_samples 4 --data.synthetic_samples_per_shard 2 --data.synthetic_latent_size 13,60,104 --data.num_workers 1 \
  --train.global_batch_size 1 --train.steps 60 2>&1 | grep -vi warn | tail -4
