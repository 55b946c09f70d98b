"""Teachers worth quantizing, for the fidelity study (benchmarks/fidelity/, docs/fidelity.md).

Real Wan 2.1 blocks (self- and cross-attention with 3D RoPE and q/k RMSNorm, adaLN modulation, GELU FFN) at a
width that a QAT error can be seen at but a teacher can be fitted in minutes, on the synthetic moving-shapes
set whose captions select colour, shape, size, speed, direction and background (hash word embeddings: no
text encoder to download).

- ``small_wan``: hidden 512 (8 x 64), 8 layers, FFN 2048 (~35 M parameters), 4 x 32 x 32 latents
  (1024 tokens): fitted on one GPU in under 10 minutes (bf16).
- ``small_wan_cpu``: the same design at hidden 128, 4 layers (~1.3 M parameters), 3 x 16 x 16 latents:
  what a CPU fits and distils in minutes (fp32), for tests and for the CPU run of the study.

Their QAT settings are QVGen's (recipes.training) with the learning rates scaled for a short run; the study
overrides steps, method and bits.
"""
from __future__ import annotations

from megatron_qvgen.config import DataConfig, ExperimentConfig, ParallelConfig, QuantConfig, WanConfig
from megatron_qvgen.recipes.registry import recipe
from megatron_qvgen.recipes.training import qvgen_train

TEXT_LEN, TEXT_DIM = 32, 64   # captions of one object are <= 16 words; two objects fit in 32 tokens


@recipe("small_wan")
def small_wan() -> ExperimentConfig:
    """Fidelity-study teacher, 36M parameters (8 Wan blocks, hidden 512), on synthetic captioned clips: one GPU.

    Fitted in one seeded command by benchmarks/fidelity/fit_teacher.sh gpu; docs/fidelity.md."""
    model = WanConfig(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=8, in_channels=16,
                      out_channels=16, text_dim=TEXT_DIM, freq_dim=256, text_len=TEXT_LEN)
    return ExperimentConfig(
        name="small_wan", model=model, quant=QuantConfig.for_method("qvgen", "w4a4", aux_rank=16),
        parallel=ParallelConfig(),
        data=DataConfig(shards="outputs/fidelity/small_wan/data", synthetic_latent_size=(4, 32, 32), num_workers=2),
        train=qvgen_train(steps=400, global_batch_size=16, micro_batch_size=16, lr=1e-4, aux_lr=1e-4,
                          recompute=False, log_interval=20, eval_interval=20, eval_microbatches=2))


@recipe("small_wan_cpu")
def small_wan_cpu() -> ExperimentConfig:
    """Fidelity-study teacher for CPUs, 1.2M parameters (4 Wan blocks, hidden 128), and the CPU-scale study.

    benchmarks/fidelity/fit_teacher.sh cpu fits it; docs/fidelity.md reports the study run on it."""
    model = WanConfig(num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4, in_channels=16,
                      out_channels=16, text_dim=TEXT_DIM, freq_dim=64, text_len=TEXT_LEN)
    return ExperimentConfig(
        name="small_wan_cpu", model=model, quant=QuantConfig.for_method("qvgen", "w4a4", aux_rank=16),
        parallel=ParallelConfig(),
        data=DataConfig(shards="outputs/fidelity/small_wan_cpu/data", synthetic_latent_size=(3, 16, 16),
                        num_workers=0),
        train=qvgen_train(steps=120, global_batch_size=8, micro_batch_size=8, lr=1e-4, aux_lr=1e-4,
                          precision="fp32", recompute=False, log_interval=20, eval_interval=10,
                          eval_microbatches=2))
