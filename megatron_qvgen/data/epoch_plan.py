"""Which samples make each micro-batch of a data-parallel rank: a pure function of (seed, epoch, rank, step).

Nothing here depends on the number of DataLoader workers, on what was read before, or on the TP/PP
rank, so: every TP/PP rank of one DP group computes the same micro-batches; a saved position (the
micro-batch counter) restores exactly; and workers can build micro-batches in any order.

Two ways to split an epoch over DP ranks (``data.split``):

- ``global`` (default): one plan of global micro-batches per epoch, the same on every rank; training step k
  takes the next ``dp_size x microbatches_per_step`` of them and rank r gets a contiguous block. A global
  batch is therefore the same set of samples (and caption drops) whatever the DP size: losses do not depend
  on how the batch is split, and a run resumes exactly at another DP size with the same global batch.
- ``shards``: each epoch deals the shards to DP ranks (balanced by sample count, a new deal each epoch) and
  shuffles each rank's samples, so a rank reads only its shards.

Without resampling DP ranks read disjoint samples and, when the counts divide, every sample once per
epoch; with resampling batches are drawn with replacement from the whole dataset. A batch never mixes
latent shapes; every rank runs the same number of micro-batches per epoch.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from megatron_qvgen.data.errors import DatasetError

# Separate random streams drawn from the same seed.
_SHARD_DEAL, _BATCHES, _RESAMPLE, _FALLBACK, _DROPOUT = 1, 2, 3, 4, 5


def stream(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class EpochPlanner:
    def __init__(self, sample_shard: np.ndarray, sample_bucket: np.ndarray, num_shards: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, resample: bool,
                 samples_per_epoch: Optional[int] = None, split: str = "shards", microbatches_per_step: int = 1):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if split not in ("global", "shards"):
            raise ValueError(f"split must be 'global' or 'shards', got {split!r}")
        if microbatches_per_step < 1:
            raise ValueError(f"microbatches_per_step must be >= 1, got {microbatches_per_step}")
        self.split, self.microbatches_per_step = split, microbatches_per_step
        self.sample_shard = sample_shard
        self.sample_bucket = sample_bucket
        self.num_shards = num_shards
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.resample = seed, resample
        self.shard_sizes = np.bincount(sample_shard, minlength=num_shards)
        samples = samples_per_epoch if samples_per_epoch is not None else len(sample_shard)
        self.micro_batches_per_epoch = samples // (dp_size * micro_batch_size)
        if split == "global":  # whole training steps only
            n = microbatches_per_step
            self.micro_batches_per_epoch = samples // (dp_size * micro_batch_size * n) * n
        if self.micro_batches_per_epoch < 1:
            raise DatasetError(f"an epoch of {samples} samples is less than one micro-batch per data-parallel "
                               f"rank ({dp_size} ranks x {micro_batch_size} samples"
                               + (f" x {microbatches_per_step} micro-batches a step)" if split == "global" else ")"))
        usable_shards = int(np.count_nonzero(self.shard_sizes))
        if not resample and split == "shards" and usable_shards < dp_size:
            raise DatasetError(f"{usable_shards} shards with usable samples cannot be split over {dp_size} "
                               "data-parallel ranks: write smaller shards, or set data.resample=true")
        self._cache_epoch: Optional[int] = None
        self._cache_plan: Optional[np.ndarray] = None
        self._cache_pools: Dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------------------------------ deal
    def shard_owners(self, epoch: int) -> np.ndarray:
        """The DP rank reading each shard this epoch (greedy by sample count over a shuffled order)."""
        order = stream(self.seed, epoch, _SHARD_DEAL).permutation(self.num_shards)
        load = np.zeros(self.dp_size, dtype=np.int64)
        owners = np.full(self.num_shards, -1, dtype=np.int64)
        for shard in order:
            if self.shard_sizes[shard] == 0:
                continue
            rank = int(np.argmin(load))
            owners[shard] = rank
            load[rank] += self.shard_sizes[shard]
        return owners

    def rank_samples(self, epoch: int) -> np.ndarray:
        """Samples this rank may read this epoch."""
        if self.resample or self.split == "global":
            return np.arange(len(self.sample_shard))
        owners = self.shard_owners(epoch)
        return np.flatnonzero(owners[self.sample_shard] == self.dp_rank)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, epoch: int) -> np.ndarray:
        """int64 [micro_batches_per_epoch, micro_batch_size] sample ids of this rank's epoch."""
        if self._cache_epoch != epoch:
            samples = self.rank_samples(epoch)
            pools = {int(b): samples[self.sample_bucket[samples] == b] for b in np.unique(self.sample_bucket[samples])}
            self._cache_pools = pools
            if self.split == "global":
                count, key = self.micro_batches_per_epoch * self.dp_size, 0
            else:
                count, key = self.micro_batches_per_epoch, self.dp_rank
            make = self._resampled if self.resample else self._permuted
            plan = make(epoch, pools, count, key)
            if self.split == "global":
                plan = plan[[self.global_index(i) for i in range(self.micro_batches_per_epoch)]]
            self._cache_plan = plan
            self._cache_epoch = epoch
        return self._cache_plan

    def global_index(self, step: int) -> int:
        """Position in the epoch's global micro-batch order of this rank's micro-batch ``step``."""
        if self.split != "global":
            return step
        n = self.microbatches_per_step
        k, j = divmod(step, n)
        return k * self.dp_size * n + self.dp_rank * n + j

    def _rng_words(self, step: int):
        """(rank key, step) seeding per-micro-batch randomness: DP-independent in the global split."""
        return (0, self.global_index(step)) if self.split == "global" else (self.dp_rank, step)

    def _permuted(self, epoch: int, pools: Dict[int, np.ndarray], count: int, key: int) -> np.ndarray:
        rng = stream(self.seed, epoch, key, _BATCHES)
        mb, batches = self.micro_batch_size, []
        while len(batches) < count:  # more than one pass only when shards are uneven
            one_pass: List[np.ndarray] = []
            for bucket in sorted(pools):
                perm = rng.permutation(pools[bucket])
                full = len(perm) // mb * mb
                one_pass.extend(perm[:full].reshape(-1, mb))
                tail = perm[full:]
                if len(tail):
                    # Fill the last batch of a shape with other samples of that shape.
                    donors = perm[:full] if full else perm
                    pad = rng.choice(donors, size=mb - len(tail), replace=len(donors) < mb - len(tail))
                    one_pass.append(np.concatenate([tail, pad]))
            batches.extend(one_pass[i] for i in rng.permutation(len(one_pass)))
        return np.stack(batches[:count]).astype(np.int64)

    def _resampled(self, epoch: int, pools: Dict[int, np.ndarray], count: int, key: int) -> np.ndarray:
        rng = stream(self.seed, epoch, key, _RESAMPLE)
        buckets = sorted(pools)
        sizes = np.asarray([len(pools[b]) for b in buckets], dtype=np.float64)
        chosen = rng.choice(len(buckets), size=count, p=sizes / sizes.sum())
        return np.stack([rng.choice(pools[buckets[c]], size=self.micro_batch_size, replace=True)
                         for c in chosen]).astype(np.int64)

    # ------------------------------------------------------------------------------------------ extras
    def fallback(self, epoch: int, step: int, slot: int, attempt: int, bucket: int) -> int:
        """A stand-in of the same shape for a slot whose whole micro-batch was unreadable."""
        self.plan(epoch)
        pool = self._cache_pools[bucket]
        return int(stream(self.seed, epoch, *self._rng_words(step), slot, attempt, _FALLBACK).choice(pool))

    def caption_dropped(self, epoch: int, step: int, probability: float) -> np.ndarray:
        if probability <= 0:
            return np.zeros(self.micro_batch_size, dtype=bool)
        return stream(self.seed, epoch, *self._rng_words(step), _DROPOUT).random(self.micro_batch_size) < probability
