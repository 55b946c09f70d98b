"""What a run directory keeps: the newest complete checkpoints, never the one ``latest`` names.

Only this run's own names are touched: complete ``iter_<step>`` directories (they carry the completion
marker that megatron_qvgen.dist_ckpt writes last) and the temporary names of saves that never finished
(``iter_<step>.incomplete``, ``.replaced``, ``.deleting``). Both functions run on global rank 0 while it holds
the run lock, so no other writer is mid-save.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from typing import List, Optional

from megatron_qvgen.dist_ckpt import is_complete

log = logging.getLogger(__name__)

ITERATION = re.compile(r"^iter_(\d+)$")
LEFTOVER = re.compile(r"^iter_\d+\.(incomplete|replaced|deleting)$")


def complete_checkpoints(save_dir: str) -> List[str]:
    """Names of the complete ``iter_*`` checkpoints, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    names = [d for d in os.listdir(save_dir) if ITERATION.match(d) and is_complete(os.path.join(save_dir, d))]
    return sorted(names, key=lambda d: int(ITERATION.match(d).group(1)))


def remove_stale_saves(save_dir: str) -> List[str]:
    """Delete what killed saves left (their checkpoint never became complete); returns the names."""
    if not os.path.isdir(save_dir):
        return []
    removed = sorted(d for d in os.listdir(save_dir) if LEFTOVER.match(d))
    for name in removed:
        shutil.rmtree(os.path.join(save_dir, name))
        log.warning("removed %s: a save that never completed (the job was killed while writing it)",
                    os.path.join(save_dir, name))
    return removed


def prune(save_dir: str, keep_last: int, latest_name: Optional[str], newest_step: int) -> List[str]:
    """After the checkpoint of ``newest_step`` is complete: delete complete checkpoints older than it
    beyond the ``keep_last`` newest, never ``latest_name``. ``keep_last`` 0 keeps all. Returns the names."""
    if keep_last <= 0:
        return []
    names = complete_checkpoints(save_dir)
    done = [d for d in names if int(ITERATION.match(d).group(1)) <= newest_step]
    doomed = [d for d in done[:-keep_last] if d != latest_name]
    for name in doomed:
        # renamed first: a kill during the deletion leaves a leftover name, never a damaged "complete" one
        path = os.path.join(save_dir, name)
        os.replace(path, path + ".deleting")
        shutil.rmtree(path + ".deleting")
    if doomed:
        log.info("retention (train.keep_last=%d): removed %s", keep_last, ", ".join(doomed))
    return doomed
