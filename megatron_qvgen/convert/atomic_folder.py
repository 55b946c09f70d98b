"""A new output folder that appears complete or not at all, with the permissions the user's umask gives.

Written as a hidden sibling, renamed into place on success, removed (it is ours) on failure. The sibling is
made with ``os.mkdir`` (mode 0o777 minus the umask), not ``tempfile.mkdtemp``, whose 0o700 would survive the
rename and hide a converted checkpoint from the user's group; the files in it get the umask's mode too.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from megatron_qvgen.convert.errors import ConversionError
from qvgen_kernels.format import chmod_per_umask


@contextlib.contextmanager
def new_folder(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``dst`` on success (``dst`` must not exist)."""
    dst = Path(dst)
    if dst.exists():
        raise ConversionError(f"{dst} already exists; choose a new destination (nothing is overwritten)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                chmod_per_umask(os.path.join(folder, name))   # safetensors writes its files 0600
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder
        raise
