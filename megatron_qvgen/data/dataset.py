"""The shards of a run, indexed once: usable samples, their latent-shape buckets, manifests checked.

Every rank builds the same catalogue from the same files, so every rank plans the same epochs.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
from braceexpand import braceexpand

from megatron_qvgen.data.errors import DatasetError
from megatron_qvgen.data.manifest import DatasetManifest, read_dataset_manifest
from megatron_qvgen.data.shard_index import ShardIndex, load_shard_index

log = logging.getLogger(__name__)


def resolve_shards(pattern: str) -> List[str]:
    """A directory (its ``*.tar``), a glob, or a brace pattern -> sorted shard paths."""
    if os.path.isdir(pattern):
        paths = glob.glob(os.path.join(glob.escape(pattern), "*.tar"))
    else:
        paths = []
        for expanded in braceexpand(pattern):
            if glob.has_magic(expanded):
                paths.extend(glob.glob(expanded))
            elif os.path.exists(expanded):
                paths.append(expanded)
            elif expanded != pattern:
                raise DatasetError(f"shard {expanded} (from the pattern {pattern}) does not exist")
    paths = sorted({p for p in paths if p.endswith(".tar") and os.path.isfile(p)})
    if not paths:
        missing = not os.path.exists(pattern) and not glob.has_magic(pattern)
        where = "does not exist" if missing else "holds no .tar shards"
        raise DatasetError(f"data.shards {pattern} {where}: point --data.shards at a directory, glob or brace pattern "
                           "of shards (data/prepare_latents.py makes them from videos), or add "
                           "--data.synthesize_if_missing true to generate the synthetic set there")
    return paths


@dataclass
class LatentDataset:
    shards: List[str]
    indexes: List[ShardIndex]
    manifest: DatasetManifest
    manifest_dir: str
    empty_prompt: np.ndarray                # (L, D) float16
    # One row per usable sample, in shard order.
    sample_shard: np.ndarray                # int64 [N] index into shards
    sample_entry: np.ndarray                # int64 [N] index into that shard's entries
    sample_bucket: np.ndarray               # int64 [N] index into bucket_shapes
    bucket_shapes: List[Tuple[int, ...]]    # latent (C, F, H, W) of each bucket
    index_problems: Counter                 # reason -> samples unusable from indexing alone

    def __len__(self) -> int:
        return len(self.sample_shard)

    def entry(self, sample: int):
        shard = int(self.sample_shard[sample])
        return self.shards[shard], self.indexes[shard].entries[int(self.sample_entry[sample])]

    def fingerprint(self) -> str:
        """Changes when shards or their usable samples change (a saved position would not fit)."""
        h = hashlib.sha256()
        for shard, index in zip(self.shards, self.indexes):
            h.update(f"{os.path.basename(shard)}:{len(index.usable)};".encode())
        h.update(repr(self.manifest.identity()).encode())
        return h.hexdigest()[:16]


def open_latent_dataset(pattern: str, max_bad_in_a_row: int, announce: bool = True) -> LatentDataset:
    """``announce``: log what indexing found wrong (truncated shards). Every rank finds the same, so the
    loader lets one rank announce it."""
    shards = resolve_shards(pattern)
    manifest, manifest_dir, empty = _common_manifest(shards)
    indexes, shard_ids, entry_ids, shapes = [], [], [], []
    problems: Counter = Counter()
    for shard_id, shard in enumerate(shards):
        index = load_shard_index(shard)
        _check_bad_run(index, max_bad_in_a_row)
        if announce:
            _announce_truncation(index)
        indexes.append(index)
        problems.update(index.problems())
        for entry_id in index.usable:
            shard_ids.append(shard_id)
            entry_ids.append(entry_id)
            shapes.append(tuple(index.entries[entry_id].latent_shape))
    if not shard_ids:
        raise DatasetError(f"the {len(shards)} shards at {pattern!r} hold no usable sample "
                           f"(problems: {dict(problems)})")
    bucket_shapes = sorted(set(shapes))
    bucket_of: Dict[Tuple[int, ...], int] = {s: i for i, s in enumerate(bucket_shapes)}
    return LatentDataset(
        shards=shards, indexes=indexes, manifest=manifest, manifest_dir=manifest_dir, empty_prompt=empty,
        sample_shard=np.asarray(shard_ids, dtype=np.int64), sample_entry=np.asarray(entry_ids, dtype=np.int64),
        sample_bucket=np.asarray([bucket_of[s] for s in shapes], dtype=np.int64), bucket_shapes=bucket_shapes,
        index_problems=problems)


def _common_manifest(shards: List[str]):
    """One manifest per shard directory; all must describe the same latents and text embeddings."""
    first = None
    for directory in sorted({os.path.dirname(os.path.abspath(s)) for s in shards}):
        manifest, empty = read_dataset_manifest(directory)
        if first is None:
            first = (manifest, directory, empty)
        elif manifest.identity() != first[0].identity():
            raise DatasetError(f"{directory}/dataset.json and {first[1]}/dataset.json describe different data "
                               "(schema, shapes, VAE, text encoder or latent normalization): read them separately")
    return first


def _announce_truncation(index: ShardIndex) -> None:
    """A shard shorter than its index says: the samples past the end are skipped (as bad samples) when read.

    They stay in the plan, so a run resumed after a shard was cut keeps its data position.
    """
    size = os.path.getsize(index.shard)
    if size >= index.tar_bytes:
        return
    cut = [e for e in index.entries if e.problem is None and any(off + n > size for off, n in e.members.values())]
    if cut:
        log.warning("shard %s is truncated: the file has %d bytes, its index was written for %d; %d of its %d samples "
                    "(from %s on) lie past the end and will be skipped as bad samples", index.shard, size,
                    index.tar_bytes, len(cut), len(index.entries), cut[0].key)


def _check_bad_run(index: ShardIndex, max_bad_in_a_row: int) -> None:
    run = 0
    for entry in index.entries:
        run = run + 1 if entry.problem is not None else 0
        if run >= max_bad_in_a_row:
            raise DatasetError(f"{run} bad samples in a row in shard {index.shard} (the last: "
                               f"{entry.problem[0]}: {entry.problem[1]}); data.max_bad_in_a_row={max_bad_in_a_row}")
