"""One encoded video on disk while its shard is not complete: ``<out>/pending/<digest>.tar`` (+ its index).

A piece is a one-sample shard (or a zero-sample one recording why the video failed), written atomically by
the ShardWriter as soon as the video is encoded, so a killed run loses only the videos being encoded. A
shard is packed from the pieces of its videos once all are there; then the pieces are removed. Pieces
are named by the video's path, not its position, so they survive a change of --world.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import time
from dataclasses import dataclass
from typing import FrozenSet, Optional, Sequence, Tuple

from megatron_qvgen.data.errors import BadSample, DatasetError
from megatron_qvgen.data.manifest import DatasetManifest
from megatron_qvgen.data.sample_reader import SampleReader
from megatron_qvgen.data.schema import Sample, SampleMeta
from megatron_qvgen.data.shard_index import index_path_for, read_shard_index
from megatron_qvgen.data.shard_writer import ShardWriter

PENDING_DIR = "pending"
PIECE_KEY = "piece"
# A temporary file untouched for this long has no live writer (writers write it continuously, then rename it).
STALE_TMP_SECONDS = 600


@dataclass(frozen=True)
class Piece:
    video: str
    sample: Optional[Sample]          # None when the video failed
    error: str = ""                   # why it failed
    stamp: Tuple[int, int] = (0, 0)   # (inode, mtime_ns) of the piece when read: removed only if unchanged


def piece_path(out_dir: str, video: str) -> str:
    digest = hashlib.sha256(video.encode("utf-8")).hexdigest()[:24]
    return os.path.join(out_dir, PENDING_DIR, f"{digest}.tar")


def write_sample_piece(out_dir: str, video: str, latent, text, meta: SampleMeta) -> None:
    os.makedirs(os.path.join(out_dir, PENDING_DIR), exist_ok=True)
    with ShardWriter(piece_path(out_dir, video), sources=[video]) as writer:
        writer.add(PIECE_KEY, latent, text, meta)


def write_failure_piece(out_dir: str, video: str, error: str) -> None:
    os.makedirs(os.path.join(out_dir, PENDING_DIR), exist_ok=True)
    with ShardWriter(piece_path(out_dir, video), sources=[video]) as writer:
        writer.add_failure(video, error)


def listed_pieces(out_dir: str) -> FrozenSet[str]:
    """The piece files there are now (one directory listing instead of a lookup per video)."""
    try:
        return frozenset(n for n in os.listdir(os.path.join(out_dir, PENDING_DIR)) if n.endswith(".tar"))
    except FileNotFoundError:
        return frozenset()


def piece_state(out_dir: str, video: str, listed: Optional[FrozenSet[str]] = None) -> Optional[str]:
    """"sample", "failed", or None (no piece, or one that cannot be read: the video is encoded again).

    ``listed``: from :func:`listed_pieces`, to skip the lookup of videos that have no piece.
    """
    path = piece_path(out_dir, video)
    if (listed is not None and os.path.basename(path) not in listed) or not os.path.exists(path):
        return None
    try:
        index = read_shard_index(path)
    except DatasetError:
        return None
    if index.sources != (video,) or len(index.entries) > 1:
        return None
    return "sample" if index.entries else "failed"


def read_piece(out_dir: str, video: str, manifest: DatasetManifest, reader: SampleReader) -> Optional[Piece]:
    """The piece of ``video``, or None when there is none, it cannot be read, or it is being replaced
    (its writer packs the shard then); ``reader`` must not reuse buffers."""
    path = piece_path(out_dir, video)
    try:
        st = os.stat(path)
        index = read_shard_index(path)
    except (FileNotFoundError, DatasetError):
        return None
    if index.sources != (video,) or len(index.entries) > 1:
        return None
    stamp = (st.st_ino, st.st_mtime_ns)
    if not index.entries:
        error = index.failures[0][1] if index.failures else "failed"
        return Piece(video, None, error, stamp)
    try:
        sample = reader.read(path, index.entries[0], manifest)
    except BadSample:
        return None
    return Piece(video, sample, "", stamp)


def pending_samples_exist(out_dir: str) -> bool:
    """Whether any piece holds a sample (failure pieces do not count)."""
    for index_path in glob.glob(os.path.join(glob.escape(out_dir), PENDING_DIR, "*.index.json")):
        with contextlib.suppress(DatasetError):
            if read_shard_index(index_path[:-len(".index.json")] + ".tar").entries:
                return True
    return False


def remove_pieces(out_dir: str, pieces: Sequence[Piece]) -> None:
    """Remove pieces that were packed, unless rewritten since they were read (a retry wrote a new one)."""
    for piece in pieces:
        path = piece_path(out_dir, piece.video)
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            if (st.st_ino, st.st_mtime_ns) == piece.stamp:
                os.remove(path)
                os.remove(index_path_for(path))


def remove_stale_temporaries(out_dir: str) -> int:
    """Remove ``*.tmp-<pid>`` files that killed writers left (none of a live writer: see STALE_TMP_SECONDS)."""
    removed = 0
    now = time.time()
    for pattern in ("*.tmp-*", os.path.join(PENDING_DIR, "*.tmp-*")):
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            with contextlib.suppress(FileNotFoundError):
                if now - os.path.getmtime(path) > STALE_TMP_SECONDS:
                    os.remove(path)
                    removed += 1
    return removed
