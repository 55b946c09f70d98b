"""The latent webdataset stream: where shards are, how they are split, batched and checked."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_qvgen.config.errors import ConfigError


@dataclass
class DataConfig:
    # Shard location: a directory of *.tar, a glob, or a brace pattern ("shards/train-{000000..000099}.tar").
    # Every directory holding shards also holds the dataset.json and empty_prompt.npy that the writers put there.
    shards: str = "outputs/synthetic/tiny_wan"
    # Make the embedded synthetic dataset at `shards` (a directory) when it holds no shards yet
    # (megatron_qvgen.data.ensure_synthetic_dataset; channels / text shape come from the model config).
    synthesize_if_missing: bool = False
    synthetic_samples: int = 64
    synthetic_samples_per_shard: int = 8
    # Latent frames, height, width of the synthetic videos.
    synthetic_latent_size: Tuple[int, int, int] = (3, 16, 16)
    # The synthetic dataset's content seed (kept apart from `seed` so reshuffling never changes the data).
    synthetic_seed: int = 0
    # DataLoader worker processes per rank (0 = read in the training process).
    num_workers: int = 2
    # Micro-batches each worker prepares ahead.
    prefetch_factor: int = 2
    # Seed of the shard split, shuffling, resampling and caption dropout.
    seed: int = 1234
    # "global": one epoch plan shared by all ranks, each global batch split over the DP ranks (losses and
    # resumes independent of the DP size). "shards": shards dealt to DP ranks, each reads only its own.
    split: str = "global"
    # False: every epoch is a permutation (each sample once). True: draws with replacement.
    resample: bool = False
    # Samples per epoch across all data-parallel ranks; None = the number of samples in the shards.
    samples_per_epoch: Optional[int] = None
    # Probability of replacing a caption by the empty-prompt embedding.
    caption_dropout: float = 0.05
    # Stop with an error naming the shard after this many bad samples in a row (per reader).
    max_bad_in_a_row: int = 32

    def __post_init__(self):
        if not self.shards:
            raise ConfigError("data.shards must name a directory, glob or brace pattern of .tar shards")
        if self.split not in ("global", "shards"):
            raise ConfigError(f"data.split must be 'global' or 'shards', got {self.split!r}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"data.seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.synthetic_seed, int) or self.synthetic_seed < 0:
            raise ConfigError(f"data.synthetic_seed must be a non-negative integer, got {self.synthetic_seed!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.max_bad_in_a_row < 1:
            raise ConfigError(f"data.max_bad_in_a_row must be >= 1, got {self.max_bad_in_a_row}")
        if self.synthetic_samples < 1 or self.synthetic_samples_per_shard < 1:
            raise ConfigError("data.synthetic_samples and data.synthetic_samples_per_shard must be >= 1")
        self.synthetic_latent_size = tuple(int(s) for s in self.synthetic_latent_size)
        if len(self.synthetic_latent_size) != 3 or min(self.synthetic_latent_size) < 1:
            raise ConfigError("data.synthetic_latent_size must be three positive integers (frames, height, "
                              f"width), got {self.synthetic_latent_size}")
