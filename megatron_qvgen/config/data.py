"""The latent webdataset stream: where shards are, how they are split, batched and checked."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_qvgen.config.errors import ConfigError


@dataclass
class DataConfig:
    # Shard location: a directory of *.tar, a glob, or a brace pattern ("shards/train-{000000..000099}.tar").
    shards: str = "outputs/synthetic/tiny_wan"
    # Make synthetic shards at `shards` when none exist (the embedded default dataset).
    synthesize_if_missing: bool = False
    num_workers: int = 2
    # Samples held for resampled shuffling per worker.
    shuffle_buffer: int = 64
    seed: int = 1234
    # Samples per epoch across all data-parallel ranks; None = count the shards' samples once.
    samples_per_epoch: Optional[int] = None
    # Probability of replacing a caption by the empty-prompt embedding.
    caption_dropout: float = 0.05
    # Stop with an error naming the shard after this many bad samples in a row.
    max_bad_in_a_row: int = 32

    def __post_init__(self):
        if not self.shards:
            raise ConfigError("data.shards must name a directory, glob or brace pattern of .tar shards")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.max_bad_in_a_row < 1:
            raise ConfigError(f"data.max_bad_in_a_row must be >= 1, got {self.max_bad_in_a_row}")
