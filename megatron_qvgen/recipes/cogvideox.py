"""CogVideoX 1.0 text-to-video recipes: the real 2B and 5B configs, and a tiny one for tests and the CPU demo.

Training hyper-parameters are QVGen's published ones (``recipes.training.qvgen_train``); the objective is
v-prediction with zero terminal SNR and the scheduler's SNR shift (2B: 3.0, 5B: 1.0, as in the
CogVideoX schedulers). Model fields are diffusers' config keys; the 2B model adds 3D sin-cos positions,
the 5B model uses 3D RoPE.
"""
from __future__ import annotations

from megatron_qvgen.config import CogVideoXConfig, DataConfig, ExperimentConfig, ParallelConfig, QuantConfig
from megatron_qvgen.recipes.registry import recipe
from megatron_qvgen.recipes.training import qvgen_train

# Where real latent shards are expected (49 frames at 480 x 720 -> 13 x 60 x 90 latents, 226 T5 tokens);
# override with --data.shards.
REAL_SHARDS = "datasets/cogvideox_latents/train-*.tar"


@recipe("tiny_cogvideox")
def tiny_cogvideox() -> ExperimentConfig:
    """A few small layers (hidden 64, sin-cos positions like the 2B): seconds per step on a CPU, splits at
    TP=2 and PP=2. Its sample size is the synthetic latents' (3 frames of 16 x 16)."""
    model = CogVideoXConfig(num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
                            time_embed_dim=32, text_embed_dim=32, num_layers=4, sample_width=16, sample_height=16,
                            sample_frames=9, max_text_seq_length=16)
    return ExperimentConfig(
        name="tiny_cogvideox", model=model, quant=QuantConfig.for_method("qvgen", "w4a4", aux_rank=8),
        parallel=ParallelConfig(), data=DataConfig(shards="outputs/synthetic/tiny_cogvideox", num_workers=0),
        train=qvgen_train(steps=12, global_batch_size=4, micro_batch_size=2, precision="fp32", recompute=False,
                          save_interval=6, log_interval=1, snr_shift_scale=3.0))


@recipe("cogvideox_2b")
def cogvideox_2b() -> ExperimentConfig:
    """CogVideoX-2B as published: 8 GPUs, global batch 64, 2000 steps, phases of T = 333 steps
    (derived: (steps - 1) // 6), 49 frames at 480 x 720, SNR shift 3.0."""
    return ExperimentConfig(
        name="cogvideox_2b", model=CogVideoXConfig(), quant=QuantConfig.for_method("qvgen", "w4a4"),
        parallel=ParallelConfig(tensor_parallel=1), data=DataConfig(shards=REAL_SHARDS),
        train=qvgen_train(steps=2000, global_batch_size=64, micro_batch_size=1, save_interval=250,
                          snr_shift_scale=3.0))


@recipe("cogvideox_5b")
def cogvideox_5b() -> ExperimentConfig:
    """CogVideoX-5B (48 heads, 42 layers, 3D RoPE), SNR shift 1.0. No public QVGen recipe exists; ours runs
    the 2B schedule (8 GPUs, global batch 64, 2000 steps, T = 333) at TP = 2 with sequence parallelism
    (226 + 17550 tokens split evenly) and the distributed optimizer, DP = 4."""
    model = CogVideoXConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
    return ExperimentConfig(
        name="cogvideox_5b", model=model, quant=QuantConfig.for_method("qvgen", "w4a4"),
        parallel=ParallelConfig(tensor_parallel=2, sequence_parallel=True, distributed_optimizer=True),
        data=DataConfig(shards=REAL_SHARDS),
        train=qvgen_train(steps=2000, global_batch_size=64, micro_batch_size=1, save_interval=250,
                          snr_shift_scale=1.0))
