"""Where each sample's members lie in a shard, and its latent shape: what the loader plans epochs with.

The writers store the index beside the shard (``x.tar`` -> ``x.index.json``) so that planning reads no
sample data. Shards without one (written by other tools) are indexed by scanning their tar headers and
each latent's .npy header. Problems found while indexing (truncated archive, missing or foreign members,
unreadable latent header) mark the sample; the loader counts and skips it.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_qvgen.data.atomic import atomic_write_bytes
from megatron_qvgen.data.errors import DatasetError
from megatron_qvgen.data.schema import LATENT, MEMBER_TYPES, npy_header

INDEX_FORMAT = "qvgen-shard-index"
INDEX_VERSION = 1
_NPY_HEADER_PROBE = 4096


@dataclass(frozen=True)
class SampleEntry:
    key: str
    # member type -> (offset of its data in the tar, size in bytes)
    members: Dict[str, Tuple[int, int]]
    latent_shape: Optional[Tuple[int, ...]]
    # (reason, detail) when indexing already showed the sample unusable
    problem: Optional[Tuple[str, str]] = None


@dataclass(frozen=True)
class ShardIndex:
    shard: str
    tar_bytes: int
    entries: Tuple[SampleEntry, ...]
    # Inputs the writer was given and those it could not turn into samples (source, error): lets a resumed
    # writer check a finished shard was made from the same inputs, and keeps failures visible afterwards.
    sources: Tuple[str, ...] = ()
    failures: Tuple[Tuple[str, str], ...] = ()

    @property
    def usable(self) -> List[int]:
        return [i for i, e in enumerate(self.entries) if e.problem is None]

    def problems(self) -> Counter:
        return Counter(e.problem[0] for e in self.entries if e.problem is not None)

    def to_json(self) -> str:
        return json.dumps({
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": os.path.basename(self.shard),
            "tar_bytes": self.tar_bytes,
            "samples": [{"key": e.key, "latent_shape": list(e.latent_shape) if e.latent_shape else None,
                         "members": {t: list(v) for t, v in e.members.items()}} for e in self.entries],
            "sources": list(self.sources), "failures": [list(f) for f in self.failures],
        }, separators=(",", ":"))


def index_path_for(shard: str) -> str:
    base = shard[:-4] if shard.endswith(".tar") else shard
    return base + ".index.json"


def write_shard_index(index: ShardIndex, path: Optional[str] = None) -> str:
    path = path or index_path_for(index.shard)
    atomic_write_bytes(path, index.to_json().encode("utf-8"))
    return path


def read_shard_index(shard: str) -> ShardIndex:
    """The sidecar index of ``shard``; a corrupt one is an error naming it (delete it to rescan)."""
    path = index_path_for(shard)
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
        if d.get("format") != INDEX_FORMAT or d.get("version") != INDEX_VERSION:
            raise ValueError(f"not a {INDEX_FORMAT} v{INDEX_VERSION} file")
        entries = tuple(_entry_from_dict(s) for s in d["samples"])
        index = ShardIndex(shard=shard, tar_bytes=int(d["tar_bytes"]), entries=entries,
                           sources=tuple(str(s) for s in d.get("sources", ())),
                           failures=tuple((str(a), str(b)) for a, b in d.get("failures", ())))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"shard index {path} is unreadable ({exc}); delete it to index {shard} by scanning"
                           ) from None
    return index


def _entry_from_dict(d) -> SampleEntry:
    members = {str(t): (int(v[0]), int(v[1])) for t, v in d["members"].items()}
    if set(members) != set(MEMBER_TYPES):
        raise ValueError(f"sample {d['key']!r} lists members {sorted(members)}")
    shape = d["latent_shape"]
    return SampleEntry(key=str(d["key"]), members=members, latent_shape=tuple(int(s) for s in shape))


def load_shard_index(shard: str) -> ShardIndex:
    """The sidecar index when there is one (checked against the tar's size), else a scan of the tar."""
    if not os.path.exists(index_path_for(shard)):
        return scan_shard(shard)
    index = read_shard_index(shard)
    size = os.path.getsize(shard)
    if size > index.tar_bytes:
        raise DatasetError(f"{shard} has {size} bytes but its index {index_path_for(shard)} was written for "
                           f"{index.tar_bytes}: the index is stale; delete it to rescan the shard")
    # A shorter file is a truncated shard: the samples past its end are reported as truncated when read.
    return index


@dataclass
class _Group:
    key: str
    members: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    problem: Optional[Tuple[str, str]] = None


def scan_shard(shard: str) -> ShardIndex:
    """Index a tar by its headers (webdataset grouping: consecutive members sharing a key form a sample)."""
    try:
        size = os.path.getsize(shard)
    except OSError as exc:
        raise DatasetError(f"shard {shard} cannot be read: {exc}") from None
    groups: List[_Group] = []
    cut_short = None
    end = 0  # where the last member's data (padded) ends
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if info.isdir():
                    continue
                base = os.path.basename(info.name)
                stem, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(info.name), stem)
                if not groups or groups[-1].key != key:
                    groups.append(_Group(key))
                group = groups[-1]
                if not info.isfile() or ext not in MEMBER_TYPES:
                    group.problem = group.problem or ("unexpected_member", f"{info.name} (never decoded)")
                elif ext in group.members:
                    group.problem = group.problem or ("unexpected_member", f"{info.name} appears twice")
                else:
                    group.members[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError) as exc:
        if not groups and not isinstance(exc, tarfile.ReadError):
            raise DatasetError(f"shard {shard} is not a tar archive: {exc}") from None
        cut_short = str(exc)
    except OSError as exc:
        raise DatasetError(f"shard {shard} cannot be read: {exc}") from None
    if not groups and cut_short is not None and size > 0:
        raise DatasetError(f"shard {shard} is not a readable tar archive: {cut_short}")
    entries = []
    with open(shard, "rb") as f:
        for group in groups:
            entries.append(_finish_entry(f, group, size))
        if cut_short is None and groups:
            # tarfile reads a header cut short as a clean end; a complete archive ends in two zero blocks.
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
            if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
                cut_short = f"no end-of-archive marker after byte {end}"
                if entries[-1].problem is None:
                    entries.append(SampleEntry(key=f"{entries[-1].key}+next", members={}, latent_shape=None,
                                               problem=("truncated", f"{shard} ends inside the header after "
                                                                     f"sample {entries[-1].key}")))
    if cut_short is not None and entries and entries[-1].problem is not None:
        # The archive broke inside a header: a sample left without all its members was cut, not malformed.
        last = entries[-1]
        if last.problem[0] == "missing_member":
            entries[-1] = SampleEntry(last.key, last.members, None, ("truncated", f"{shard}: {cut_short}"))
    return ShardIndex(shard=shard, tar_bytes=size, entries=tuple(entries))


def _finish_entry(f, group: _Group, size: int) -> SampleEntry:
    problem = group.problem
    if problem is None and any(off + n > size for off, n in group.members.values()):
        problem = ("truncated", f"{group.key}: the shard ends inside this sample")
    if problem is None and set(group.members) != set(MEMBER_TYPES):
        problem = ("missing_member", f"{group.key}: has {sorted(group.members)}")
    shape = None
    if problem is None:
        offset, length = group.members[LATENT]
        f.seek(offset)
        try:
            shape, _, _, _ = npy_header(f.read(min(length, _NPY_HEADER_PROBE)))
        except ValueError as exc:
            problem = ("corrupt_npy", f"{group.key}.{LATENT}: {exc}")
    return SampleEntry(key=group.key, members=dict(group.members), latent_shape=shape, problem=problem)
