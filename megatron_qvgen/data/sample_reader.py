"""Random access to indexed samples: three ``pread`` calls per sample, no tar parsing at read time.

One reader per process: file descriptors are opened lazily and never shared across a fork (DataLoader
workers each open their own).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np

from megatron_qvgen.data.errors import BadSample
from megatron_qvgen.data.manifest import DatasetManifest
from megatron_qvgen.data.schema import Sample, decode_sample
from megatron_qvgen.data.shard_index import SampleEntry


class SampleReader:
    """``reuse_buffers=True``: members are read into buffers kept between calls (no page faults on fresh
    memory for every multi-MB sample); the arrays of a returned Sample are then valid only until the
    next ``read``. The loader copies them into its batch at once.
    """

    def __init__(self, max_open_files: int = 64, reuse_buffers: bool = False):
        self._max_open = max_open_files
        self._fds: "OrderedDict[str, int]" = OrderedDict()
        self._pid = os.getpid()
        self._reuse = reuse_buffers
        self._buffers: Dict[str, np.ndarray] = {}

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():
            # Forked: the inherited descriptors belong to the parent's bookkeeping; open our own.
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        if len(self._fds) > self._max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def read_bytes(self, path: str, offset: int, size: int, slot: Optional[str] = None, what: str = "a member"):
        """``size`` bytes at ``offset``; a writable buffer (reused per ``slot`` with reuse_buffers).

        ``what`` names the member in errors; a file too short for it is reported with its real size.
        """
        if self._reuse and slot is not None:
            held = self._buffers.get(slot)
            if held is None or held.size < size:
                held = self._buffers[slot] = np.empty(size, np.uint8)
            buf = held[:size]
        else:
            buf = bytearray(size)
        try:
            fd = self._fd(path)
            got = os.preadv(fd, [buf], offset)
            file_size = os.fstat(fd).st_size if got != size else None
        except OSError as exc:
            raise BadSample("unreadable", f"{path}: {exc}") from None
        if got != size:
            raise BadSample("truncated", f"{path} is {file_size} bytes long, {what} ({size} bytes at byte {offset}) "
                                         f"needs it to reach byte {offset + size}: the shard is truncated")
        return buf

    def read(self, shard: str, entry: SampleEntry, manifest: DatasetManifest) -> Sample:
        if entry.problem is not None:
            raise BadSample(*entry.problem)
        members = {t: self.read_bytes(shard, off, n, slot=t, what=f"{entry.key}.{t}")
                   for t, (off, n) in entry.members.items()}
        return decode_sample(entry.key, members, manifest, entry.latent_shape)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()
