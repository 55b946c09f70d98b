"""Optimisation, schedule, precision, checkpoints and logging of a distillation run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_qvgen.config.errors import ConfigError


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 1
    # Learning rates (QVGEN.md): weights, biases, norms, s, z, L, R at `lr`; activation clip logits at act_clip_lr.
    lr: float = 3e-5
    aux_lr: float = 3e-5
    act_clip_lr: float = 1e-2
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0
    # "bf16" (bf16 params, fp32 main params in the optimizer) or "fp32".
    precision: str = "bf16"
    # Activation checkpointing of every transformer block.
    recompute: bool = False
    seed: int = 42
    # Flow-matching timestep shift (Wan); CogVideoX's snr shift lives in its recipe.
    flow_shift: float = 1.0
    snr_shift_scale: float = 1.0
    # Checkpoints: None disables saving / loading.
    save_dir: Optional[str] = None
    save_interval: int = 0
    load_dir: Optional[str] = None
    # Logging.
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    image_interval: int = 0
    # Student-vs-teacher loss on a fixed set of eval_microbatches noisy inputs every eval_interval steps
    # (0 = off): the trend that per-step losses, each at a random noise level, hide.
    eval_interval: int = 0
    eval_microbatches: int = 4
    # Consecutive non-finite losses tolerated (each skipped and counted) before the run stops.
    max_consecutive_nonfinite: int = 3

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        for name in ("lr", "aux_lr", "act_clip_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0")
        if self.eval_interval < 0 or self.eval_microbatches < 1:
            raise ConfigError("train.eval_interval must be >= 0 and train.eval_microbatches >= 1")
        if self.save_interval < 0 or self.log_interval < 1:
            raise ConfigError("train.save_interval must be >= 0 and train.log_interval >= 1")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError("train.max_consecutive_nonfinite must be >= 1")

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_rank = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_rank:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                              f"micro_batch_size x data_parallel = {self.micro_batch_size} x {data_parallel_size}")
        return self.global_batch_size // per_rank
