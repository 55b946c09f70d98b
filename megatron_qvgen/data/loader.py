"""The training loader: an endless iterator of micro-batches with a position a checkpoint can hold.

    loader = build_latent_loader(cfg.data, micro_batch_size, dp_rank=info.dp_rank, dp_size=info.dp_size)
    batch = next(loader)                  # LatentBatch
    state = loader.state_dict()           # JSON-able; the same on every rank except bad-sample counts
    loader.load_state_dict(state)         # the next batch is the one an uninterrupted run would give

Micro-batch ``i`` (counted from the start of training) is assembled whole by one worker from the
plan of :mod:`epoch_plan`; DataLoader hands the indices round-robin to its workers and returns them in
order, so workers never duplicate a sample and the position is simply ``i``.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from megatron_qvgen.config.data import DataConfig
from megatron_qvgen.data.dataset import LatentDataset, open_latent_dataset
from megatron_qvgen.data.epoch_plan import EpochPlanner
from megatron_qvgen.data.errors import BadSample, DatasetError
from megatron_qvgen.data.manifest import MANIFEST_NAME
from megatron_qvgen.data.model_fit import check_dataset_fits_model
from megatron_qvgen.data.sample_reader import SampleReader

log = logging.getLogger(__name__)
STATE_FORMAT = "qvgen-latent-loader"
STATE_VERSION = 1


@dataclass
class LatentBatch:
    latents: torch.Tensor            # float32 [B, C, F, H, W], stored layout and normalization (manifest.latent_norm)
    text: torch.Tensor               # float32 [B, L, D]; the empty-prompt embedding where the caption was dropped
    captions: List[str]              # "" where the caption was dropped
    keys: List[str]
    caption_dropped: torch.Tensor    # bool [B]
    epoch: int
    index: int                       # micro-batch number since the start of training
    bad_samples: Dict[str, int] = field(default_factory=dict)  # skipped while assembling this batch

    def pin_memory(self) -> "LatentBatch":
        return replace(self, latents=self.latents.pin_memory(), text=self.text.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "LatentBatch":
        return replace(self, latents=self.latents.to(device, non_blocking=non_blocking),
                       text=self.text.to(device, non_blocking=non_blocking))


class MicroBatchBuilder(Dataset):
    """Map-style dataset over micro-batch numbers: ``builder[i]`` is micro-batch ``i`` of this rank."""

    def __init__(self, dataset: LatentDataset, planner: EpochPlanner, caption_dropout: float, max_bad_in_a_row: int,
                 log_bad_samples: bool = True):
        self.dataset = dataset
        self.log_bad_samples = log_bad_samples
        self.planner = planner
        self.caption_dropout = caption_dropout
        self.max_bad_in_a_row = max_bad_in_a_row
        self.reader = SampleReader(reuse_buffers=True)  # _fill copies each sample out before the next read
        self.empty_prompt = torch.from_numpy(dataset.empty_prompt.astype(np.float32))
        self._bad_in_a_row = 0

    def __getitem__(self, index: int) -> LatentBatch:
        epoch, step = divmod(int(index), self.planner.micro_batches_per_epoch)
        plan = self.planner.plan(epoch)[step]
        mb = len(plan)
        c, f, h, w = self.dataset.bucket_shapes[int(self.dataset.sample_bucket[plan[0]])]
        latents = torch.empty(mb, c, f, h, w)
        text = torch.empty(mb, self.dataset.manifest.text_len, self.dataset.manifest.text_dim)
        if get_worker_info() is not None:  # built in shared memory: no copy on the way to the trainer
            latents.share_memory_()
            text.share_memory_()
        captions, keys = [""] * mb, [""] * mb
        bad: Counter = Counter()
        good_slots, bad_slots = [], []
        for slot, sample in enumerate(plan):
            ok = self._fill(int(sample), slot, latents, text, captions, keys, bad)
            (good_slots if ok else bad_slots).append(slot)
        for n, slot in enumerate(bad_slots):
            if good_slots:  # stand in with a good sample of the same batch: no extra read
                donor = good_slots[n % len(good_slots)]
                latents[slot].copy_(latents[donor])
                text[slot].copy_(text[donor])
                captions[slot], keys[slot] = captions[donor], keys[donor]
                continue
            bucket = int(self.dataset.sample_bucket[plan[slot]])
            for attempt in itertools.count():
                sample = self.planner.fallback(epoch, step, slot, attempt, bucket)
                if self._fill(sample, slot, latents, text, captions, keys, bad):
                    good_slots.append(slot)
                    break
        dropped = self.planner.caption_dropped(epoch, step, self.caption_dropout)
        for slot in np.flatnonzero(dropped):
            text[slot].copy_(self.empty_prompt)
            captions[slot] = ""
        return LatentBatch(latents=latents, text=text, captions=captions, keys=keys,
                           caption_dropped=torch.from_numpy(dropped.copy()), epoch=epoch, index=int(index),
                           bad_samples=dict(bad))

    def _fill(self, sample: int, slot: int, latents, text, captions, keys, bad: Counter) -> bool:
        shard, entry = self.dataset.entry(sample)
        try:
            decoded = self.reader.read(shard, entry, self.dataset.manifest)
        except BadSample as exc:
            bad[exc.reason] += 1
            self._bad_in_a_row += 1
            if self.log_bad_samples:
                log.warning("skipping sample %s of %s: %s", entry.key, shard, exc)
            if self._bad_in_a_row >= self.max_bad_in_a_row:
                raise DatasetError(f"{self._bad_in_a_row} bad samples in a row, the last in shard {shard} "
                                   f"({exc}); data.max_bad_in_a_row={self.max_bad_in_a_row}") from None
            return False
        self._bad_in_a_row = 0
        latents[slot].copy_(torch.from_numpy(decoded.latent))
        text[slot].copy_(torch.from_numpy(decoded.text))
        captions[slot], keys[slot] = decoded.meta.caption, decoded.key
        return True


class _CountFrom(Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _as_is(batch):
    return batch


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


class LatentLoader:
    def __init__(self, dataset: LatentDataset, cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int,
                 microbatches_per_step: int = 1, log_bad_samples: bool = True):
        self.cfg = cfg
        self.dataset = dataset
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.microbatches_per_step = microbatches_per_step
        self.planner = EpochPlanner(dataset.sample_shard, dataset.sample_bucket, len(dataset.shards),
                                    micro_batch_size, dp_rank, dp_size, cfg.seed, cfg.resample, cfg.samples_per_epoch,
                                    split=cfg.split, microbatches_per_step=microbatches_per_step)
        self.builder = MicroBatchBuilder(dataset, self.planner, cfg.caption_dropout, cfg.max_bad_in_a_row,
                                         log_bad_samples)
        self._position = 0
        self._read_bad: Counter = Counter()
        self._iterator: Optional[Iterator[LatentBatch]] = None

    # ------------------------------------------------------------------------------------------ facts
    @property
    def micro_batches_per_epoch(self) -> int:
        return self.planner.micro_batches_per_epoch

    @property
    def position(self) -> int:
        """Micro-batches consumed since the start of training (the next batch has this index)."""
        return self._position

    @property
    def epoch(self) -> int:
        return self._position // self.micro_batches_per_epoch

    @property
    def manifest(self):
        return self.dataset.manifest

    @property
    def empty_prompt_embedding(self) -> torch.Tensor:
        """float32 [L, D]: what a dropped caption becomes (also the unconditional input of CFG sampling)."""
        return self.builder.empty_prompt.clone()

    @property
    def bad_samples(self) -> Dict[str, int]:
        """Skipped samples by reason: found while indexing the shards plus those met in consumed batches."""
        return dict(self.dataset.index_problems + self._read_bad)

    # ------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> "LatentLoader":
        return self

    def __next__(self) -> LatentBatch:
        if self._iterator is None:
            self._iterator = self._start(self._position)
        batch = next(self._iterator)
        if batch.index != self._position:
            raise RuntimeError(f"data loader returned micro-batch {batch.index}, expected {self._position}")
        self._position += 1
        self._read_bad.update(batch.bad_samples)
        return batch

    def _start(self, start: int) -> Iterator[LatentBatch]:
        if self.cfg.num_workers == 0:
            return (self.builder[i] for i in itertools.count(start))
        loader = DataLoader(self.builder, batch_size=None, sampler=_CountFrom(start), collate_fn=_as_is,
                            num_workers=self.cfg.num_workers, prefetch_factor=self.cfg.prefetch_factor,
                            pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init)
        return iter(loader)

    def close(self) -> None:
        """Stop the worker processes (they restart on the next ``next``)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.builder.reader.close()

    # ------------------------------------------------------------------------------------------ position
    def _layout(self) -> Dict[str, Any]:
        return {"micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size,
                "micro_batches_per_epoch": self.micro_batches_per_epoch, "seed": self.cfg.seed,
                "resample": self.cfg.resample, "split": self.cfg.split,
                "microbatches_per_step": self.microbatches_per_step, "dataset": self.dataset.fingerprint()}

    def state_dict(self) -> Dict[str, Any]:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "position": self._position, "epoch": self.epoch,
                "dp_rank": self.dp_rank, "bad_samples": dict(self._read_bad), **self._layout()}

    def load_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        """Continue from a saved position.

        Same layout (micro-batch size, DP size, seed, dataset): exactly where it stopped. Otherwise
        ``strict=True`` refuses, naming what differs; ``strict=False`` continues in the same epoch at the
        same fraction of it (for resuming at another parallel layout).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a data loader state (expected format 'qvgen-latent-loader')")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        try:
            position, epoch = int(state["position"]), int(state["epoch"])
            saved = {k: state.get(k, default) for k, default in
                     (("split", "shards"), ("microbatches_per_step", 1))}
            saved.update({k: state[k] for k in self._layout() if k not in saved})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"data loader state is incomplete: {exc}") from None
        differs = {k: (saved[k], v) for k, v in self._layout().items() if saved[k] != v}
        if differs:
            if strict:
                raise ValueError("data loader state was saved for another layout or dataset (saved, now): "
                                 f"{differs}; load with strict=False to continue at the same point of epoch {epoch}")
            fraction = (position - epoch * int(saved["micro_batches_per_epoch"])) / int(saved["micro_batches_per_epoch"])
            position = epoch * self.micro_batches_per_epoch + int(fraction * self.micro_batches_per_epoch)
            log.warning("data position translated to a new layout %s: micro-batch %d (epoch %d)", differs, position, epoch)
        self.close()
        self._position = position
        same_rank = state.get("dp_rank") == self.dp_rank and not differs
        self._read_bad = Counter(state.get("bad_samples", {})) if same_rank else Counter()


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def build_latent_loader(cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, *, model=None,
                        latent_channels: Optional[int] = None, text_len: Optional[int] = None,
                        text_dim: Optional[int] = None, microbatches_per_step: int = 1,
                        log_bad_samples: Optional[bool] = None) -> LatentLoader:
    """The loader of one data-parallel rank; pass the DP rank and size, never the global rank.

    ``microbatches_per_step``: micro-batches each rank takes per training step (gradient accumulation);
    with ``data.split = "global"`` it fixes which block of a global batch this rank gets.

    ``model`` (a WanConfig / CogVideoXConfig), or ``latent_channels`` / ``text_len`` / ``text_dim``: checked
    against the dataset's manifest before anything is read; a mismatch names the ``--model.*`` flags to set.

    ``log_bad_samples``: whether this rank logs each bad sample it meets (all count them). The ranks of one
    tensor/pipeline-parallel group read the same samples, so one of them should log: pass
    ``tp_rank == 0 and pp_rank == 0``. Default: global rank 0 only. Problems that indexing finds (a
    truncated shard) are the same on every rank and are logged by global rank 0.
    """
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
    if not isinstance(dp_size, int) or dp_size < 1 or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank!r} must be in [0, dp_size={dp_size!r})")
    rank_zero = _is_rank_zero()
    dataset = open_latent_dataset(cfg.shards, cfg.max_bad_in_a_row, announce=rank_zero)
    check_dataset_fits_model(dataset.manifest, f"{dataset.manifest_dir}/{MANIFEST_NAME}", model,
                             latent_channels=latent_channels, text_len=text_len, text_dim=text_dim)
    return LatentLoader(dataset, cfg, micro_batch_size, dp_rank, dp_size, microbatches_per_step,
                        log_bad_samples=rank_zero if log_bad_samples is None else log_bad_samples)
