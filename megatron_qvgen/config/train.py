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
    # The cosine ends at lr * min_lr_ratio (1: constant lr after the warm-up).
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
    # Checkpoints. save_dir: this run's directory (checkpoints, `latest`, the run lock); None saves nothing.
    # A run always resumes from its own newest checkpoint; load_dir (a checkpoint or a run directory) is
    # read only when save_dir holds none: it starts a new run from there.
    save_dir: Optional[str] = None
    save_interval: int = 0
    load_dir: Optional[str] = None
    # Also save when this many minutes have passed since the last save (0 = off): a cadence that does not
    # depend on how long a step takes at this resolution and layout.
    save_interval_minutes: float = 0.0
    # Save and stop (exit status 75, "stopped to be requeued") so that the checkpoint is complete within
    # this many minutes of the start, judged from the measured step and save times (0 = off).
    exit_after_minutes: float = 0.0
    # Retention: after a save completes, keep the keep_last newest complete checkpoints (and always the one
    # `latest` names); older ones are deleted. 0 keeps every checkpoint.
    keep_last: int = 2
    # Take over the run directory even if its lock names another live writer (after checking it is gone).
    break_lock: bool = False
    # Spread the writing of tensors replicated over data-parallel ranks across those ranks (megatron's
    # fully parallel save strategy) instead of leaving it all to data-parallel rank 0.
    fully_parallel_save: bool = True
    # Write checkpoints in a background process while training continues (megatron's async save); the
    # checkpoint becomes `latest` when every rank has finished writing it.
    async_save: bool = False
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
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1] (1: constant after the warm-up), "
                              f"got {self.min_lr_ratio}")
        for name in ("lr", "aux_lr", "act_clip_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0")
        if self.eval_interval < 0 or self.eval_microbatches < 1:
            raise ConfigError("train.eval_interval must be >= 0 and train.eval_microbatches >= 1")
        if self.save_interval < 0 or self.log_interval < 1:
            raise ConfigError("train.save_interval must be >= 0 and train.log_interval >= 1")
        for name in ("save_interval_minutes", "exit_after_minutes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"train.{name} must be a number >= 0 (0 = off), got {value!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ConfigError(f"train.keep_last must be an integer >= 0 (0 = keep all), got {self.keep_last!r}")
        if self.async_save and not self.save_dir:
            raise ConfigError("train.async_save needs train.save_dir (there is nothing to save without it)")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError("train.max_consecutive_nonfinite must be >= 1")

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_rank = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_rank:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                              f"micro_batch_size x data_parallel = {self.micro_batch_size} x {data_parallel_size}")
        return self.global_batch_size // per_rank
