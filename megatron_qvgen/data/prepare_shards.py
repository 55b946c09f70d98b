"""Which videos each shard holds, which of them are done, and packing a shard from the pieces of its videos.

Shard ``j`` holds videos ``[j*n, (j+1)*n)`` of the sorted list (n = samples per shard), in that order, as
samples ``<j>_<k>`` (k = the video's position in the shard). A shard file exists only with at least one
sample; its index records the videos that failed. A shard is (re)packed when every video that is not
already a sample in it has a piece: any process may do it (the one that wrote the last piece does), and
two processes packing the same shard write the same bytes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import AbstractSet, Dict, List, Optional, Sequence

from megatron_qvgen.data.errors import BadSample, DatasetError
from megatron_qvgen.data.manifest import DatasetManifest
from megatron_qvgen.data.prepare_options import PrepareOptions
from megatron_qvgen.data.prepare_pieces import read_piece, remove_pieces
from megatron_qvgen.data.sample_reader import SampleReader
from megatron_qvgen.data.shard_index import SampleEntry, ShardIndex, read_shard_index
from megatron_qvgen.data.shard_writer import ShardWriter

log = logging.getLogger(__name__)


def shard_blocks(videos: Sequence[str], samples_per_shard: int) -> List[List[str]]:
    return [list(videos[i:i + samples_per_shard]) for i in range(0, len(videos), samples_per_shard)]


def sample_key(shard: int, position: int) -> str:
    return f"{shard:06d}_{position:04d}"


@dataclass
class PackedShard:
    """A shard on disk: its samples by video, and the videos it records as failed."""
    index: ShardIndex
    samples: Dict[str, SampleEntry]
    failures: Dict[str, str]


def packed_shard(opts: PrepareOptions, shard: int, block: Sequence[str]) -> Optional[PackedShard]:
    """The shard as written (None if absent or empty); DatasetError if it was made from other videos."""
    path = opts.shard_path(shard)
    if not os.path.exists(path):
        return None
    index = read_shard_index(path)
    if not index.entries:
        return None  # a shard of failures only (older versions wrote those): its videos are encoded again
    if index.sources != tuple(block):
        raise DatasetError(f"{path} was made from other videos than the current list puts in it (videos were "
                           "added or removed, or --samples-per-shard changed): prepare into a new --out")
    samples = {}
    for entry in index.entries:
        position = int(entry.key.rsplit("_", 1)[-1])
        samples[block[position]] = entry
    return PackedShard(index, samples, dict(index.failures))


def pack_if_ready(opts: PrepareOptions, shard: int, block: Sequence[str], manifest: DatasetManifest,
                  upcoming: AbstractSet[str] = frozenset()) -> bool:
    """Write the shard when each of its videos is a sample in it or has a piece, and something changes.

    ``upcoming``: videos this process is still going to encode (a piece of theirs from an earlier run is
    about to be replaced: packing now would write the shard twice). Returns whether it was written.
    Pieces of a block that failed entirely stay (nothing to pack: the next run tries them again).
    """
    try:
        current = packed_shard(opts, shard, block)
    except DatasetError:
        return False  # reported by the run's first check
    done = current.samples if current is not None else {}
    needed = [v for v in block if v not in done]
    if not needed or any(v in upcoming for v in needed):
        return False
    reader = SampleReader()
    try:
        pieces = [read_piece(opts.out_dir, v, manifest, reader) for v in needed]
        if any(p is None for p in pieces):
            return False
        new_samples = [p for p in pieces if p.sample is not None]
        failures = {p.video: p.error for p in pieces if p.sample is None}
        if not new_samples and (current is None or failures == current.failures):
            if current is not None:
                remove_pieces(opts.out_dir, pieces)  # the same failures are already recorded
            return False
        by_video = {p.video: p for p in pieces}
        path = opts.shard_path(shard)
        with ShardWriter(path, sources=block) as writer:
            for position, video in enumerate(block):
                key = sample_key(shard, position)
                if video in done:
                    old = reader.read(path, done[video], manifest)
                    writer.add(key, old.latent, old.text, old.meta)
                elif by_video[video].sample is not None:
                    sample = by_video[video].sample
                    writer.add(key, sample.latent, sample.text, sample.meta)
                else:
                    writer.add_failure(video, by_video[video].error)
    except (BadSample, FileNotFoundError) as exc:
        # Another process replaced the shard or a piece meanwhile; the one that wrote last packs.
        log.info("not packing %s now: %s", opts.shard_path(shard), exc)
        return False
    finally:
        reader.close()
    remove_pieces(opts.out_dir, pieces)
    return True
