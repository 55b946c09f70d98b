"""Wan 2.1 text-to-video recipes: the real 1.3B and 14B configs, and a tiny one for tests and the CPU demo.

Training hyper-parameters are QVGen's published ones (../shared/QVGEN.md): AdamW (0.9, 0.95), eps 1e-8,
weight decay 1e-4, lr 3e-5 (weights, quantizer scales, auxiliary factors) and 1e-2 (activation clip
logits), 10% warm-up then cosine, grad-norm clip 1.0, bf16 with fp32 main parameters, activation
checkpointing, flow-matching shift 1, W4A4 QVGen with rank 32 decaying over six phases.
"""
from __future__ import annotations

from megatron_qvgen.config import DataConfig, ExperimentConfig, ParallelConfig, QuantConfig, WanConfig
from megatron_qvgen.recipes.registry import recipe
from megatron_qvgen.recipes.training import qvgen_train

# Where real latent shards are expected; override with --data.shards.
REAL_SHARDS = "datasets/wan_latents/train-*.tar"


@recipe("tiny_wan")
def tiny_wan() -> ExperimentConfig:
    """A few small layers (hidden 64): seconds per step on a CPU, splits at TP=2 and PP=2."""
    model = WanConfig(num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
                      text_dim=32, freq_dim=32, ffn_dim=128, num_layers=4, text_len=16)
    return ExperimentConfig(
        name="tiny_wan", model=model, quant=QuantConfig.for_method("qvgen", "w4a4", aux_rank=8),
        parallel=ParallelConfig(), data=DataConfig(shards="outputs/synthetic/tiny_wan", num_workers=0),
        train=qvgen_train(steps=12, global_batch_size=4, micro_batch_size=2, precision="fp32",
                           recompute=False, save_interval=6, log_interval=1))


@recipe("wan_1_3b")
def wan_1_3b() -> ExperimentConfig:
    """Wan2.1-T2V-1.3B as published: 8 GPUs, global batch 48, 2667 steps, phases of T = 444 steps
    (derived: (steps - 1) // 6)."""
    model = WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
    return ExperimentConfig(
        name="wan_1_3b", model=model, quant=QuantConfig.for_method("qvgen", "w4a4"),
        parallel=ParallelConfig(tensor_parallel=1), data=DataConfig(shards=REAL_SHARDS),
        train=qvgen_train(steps=2667, global_batch_size=48, micro_batch_size=1, save_interval=500))


@recipe("wan_14b")
def wan_14b() -> ExperimentConfig:
    """Wan2.1-T2V-14B on 32 x H100 (4 nodes x 8): TP = 8 with sequence parallelism inside a node,
    DP = 4, distributed optimizer, activation recompute. No public recipe exists; the schedule
    (global batch 64, 4000 steps ~ 16 epochs of 16K videos, T = 666) is ours.

    Memory per GPU (H100 80 GB), 14.29 B parameters, 720p x 81 frames = 75,600 tokens, micro-batch 1:
      student bf16 weights                  14.29 B / TP 8 x 2 B                     3.6 GB
      fp32 main params + Adam moments       14.29 B / 8 / DP 4 x 12 B (dist. opt.)   5.4 GB
      fp32 gradient buffer                  14.29 B / 8 x 4 B                        7.1 GB
      QVGen tensors (s, z, clip logits, L, R at r0 = 32, with their optimizer state)  0.3 GB
      frozen teacher, bf16                  14.29 B / 8 x 2 B                        3.6 GB
      saved block inputs (full recompute)   40 x 75,600 / 8 (SP) x 5120 x 2 B        3.9 GB
      one block's recomputed activations    gathered sequence, QKV, attention, FFN
                                            (13824 / 8), fake-quant temporaries     ~10 GB
      ------------------------------------------------------------------------------------
      total                                                                          ~34 GB
    so one node's 8 GPUs hold the model with room for the CUDA/NCCL workspaces; the same layout at
    DP = 1 (one node) needs 14.29 B / 8 x 12 B = 21 GB of optimizer state instead of 5.4 GB.
    """
    model = WanConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
    return ExperimentConfig(
        name="wan_14b", model=model, quant=QuantConfig.for_method("qvgen", "w4a4"),
        parallel=ParallelConfig(tensor_parallel=8, sequence_parallel=True, distributed_optimizer=True),
        data=DataConfig(shards=REAL_SHARDS),
        train=qvgen_train(steps=4000, global_batch_size=64, micro_batch_size=1, save_interval=250))
