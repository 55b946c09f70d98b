"""Write one webdataset shard: deterministic tar bytes, its index beside it, completion by rename.

The tar is written under a temporary name, then the index, then the tar is renamed: a ``*.tar`` that
exists is complete (writers resume by skipping those), and the same samples give the same bytes.
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron_qvgen.data.atomic import temporary_name
from megatron_qvgen.data.schema import (
    LATENT, META, MEMBER_TYPES, TEXT, SampleMeta, check_key, encode_npy, has_non_finite,
)
from megatron_qvgen.data.shard_index import SampleEntry, ShardIndex, write_shard_index


class ShardWriter:
    def __init__(self, path: str, sources: Sequence[str] = ()):
        if not path.endswith(".tar"):
            raise ValueError(f"shard names end in .tar, got {path!r}")
        self.path = path
        self._tmp = temporary_name(path)
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._entries: List[SampleEntry] = []
        self._failures: List[Tuple[str, str]] = []
        self._sources = tuple(sources)
        self._keys = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, latent: np.ndarray, text: np.ndarray, meta: SampleMeta) -> None:
        """Append one sample; arrays are stored float16 and must match the json's shapes and be finite."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} is already in {self.path}")
        latent = np.asarray(latent).astype(np.float16)
        text = np.asarray(text).astype(np.float16)
        if latent.shape != tuple(meta.latent_shape) or text.shape != tuple(meta.text_shape):
            raise ValueError(f"{key}: arrays {latent.shape}, {text.shape} disagree with the json "
                             f"{meta.latent_shape}, {meta.text_shape}")
        for what, array in ((LATENT, latent), (TEXT, text)):
            if has_non_finite(array):
                raise ValueError(f"{key}.{what} is not finite in float16 (NaN, inf or beyond 65504)")
        payloads = {LATENT: encode_npy(latent), TEXT: encode_npy(text), META: meta.to_json_bytes()}
        members: Dict[str, Tuple[int, int]] = {}
        for member_type in MEMBER_TYPES:
            members[member_type] = self._add_member(f"{key}.{member_type}", payloads[member_type])
        self._keys.add(key)
        self._entries.append(SampleEntry(key=key, members=members, latent_shape=latent.shape))

    def add_failure(self, source: str, error: str) -> None:
        """Record an input that produced no sample, so the failure stays visible in the index."""
        self._failures.append((source, error))

    def _add_member(self, name: str, data: bytes) -> Tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        data_offset = start + tarfile.BLOCKSIZE  # ustar: one header block, no extended headers
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if self._tar.offset != data_offset + padded:
            raise RuntimeError(f"unexpected tar header layout for {name}")
        return data_offset, len(data)

    def close(self) -> ShardIndex:
        """Finish the tar, write its index, rename it into place; returns the index."""
        if self._closed:
            raise RuntimeError(f"{self.path} is already closed")
        self._closed = True
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            index = ShardIndex(shard=self.path, tar_bytes=os.path.getsize(self._tmp), entries=tuple(self._entries),
                               sources=self._sources, failures=tuple(self._failures))
            write_shard_index(index)
            os.replace(self._tmp, self.path)
        except BaseException:
            self._remove_tmp()
            raise
        return index

    def abort(self) -> None:
        """Drop the partial shard (only the temporary file this writer created)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._tar.close()
        with contextlib.suppress(Exception):
            self._file.close()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
