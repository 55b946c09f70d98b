"""QVGen's published training hyper-parameters, shared by every recipe (../shared/QVGEN.md).

AdamW (0.9, 0.95), eps 1e-8, weight decay 1e-4, lr 3e-5 (weights, quantizer scales, auxiliary factors)
and 1e-2 (activation clip logits), 10% warm-up then cosine to 0, grad-norm clip 1.0, bf16 with fp32 main
parameters, activation checkpointing. Recipes override the run's length, batch and objective settings.
"""
from __future__ import annotations

from megatron_qvgen.config import TrainConfig


def qvgen_train(**fields) -> TrainConfig:
    base = dict(lr=3e-5, aux_lr=3e-5, act_clip_lr=1e-2, weight_decay=1e-4, adam_beta1=0.9, adam_beta2=0.95,
                adam_eps=1e-8, warmup_fraction=0.1, min_lr_ratio=0.0, clip_grad=1.0, precision="bf16",
                recompute=True, flow_shift=1.0)
    base.update(fields)
    return TrainConfig(**base)
