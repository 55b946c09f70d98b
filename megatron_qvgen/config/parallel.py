"""Parallel layout: tensor, pipeline and (derived) data parallel sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_qvgen.config.errors import ConfigError


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Interleaved (virtual) pipeline chunks per stage; None = plain 1F1B.
    virtual_pipeline: Optional[int] = None
    # Shard the token dimension between TP ranks outside the linears (needs tensor_parallel > 1).
    sequence_parallel: bool = False
    # megatron's distributed optimizer (ZeRO-1 over data-parallel ranks); its checkpoints reshard over
    # TP/PP/DP like the plain optimizer's (training/optimizer_checkpoint.py).
    distributed_optimizer: bool = False
    # "auto" = nccl when CUDA is present, gloo otherwise.
    backend: str = "auto"

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.virtual_pipeline is not None:
            if self.virtual_pipeline < 1:
                raise ConfigError(f"parallel.virtual_pipeline must be >= 1, got {self.virtual_pipeline}")
            if self.pipeline_parallel < 2 and self.virtual_pipeline > 1:
                raise ConfigError("parallel.virtual_pipeline > 1 needs parallel.pipeline_parallel > 1")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"parallel.backend must be auto, gloo or nccl, got {self.backend!r}")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def data_parallel_size(self, world_size: int) -> int:
        self.check_world_size(world_size)
        return world_size // self.model_parallel_size

    def check_world_size(self, world_size: int) -> None:
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = "
                f"{self.tensor_parallel} x {self.pipeline_parallel}"
            )
