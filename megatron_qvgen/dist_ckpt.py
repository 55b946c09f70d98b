"""megatron dist_checkpointing (torch_dist) with atomic directories and clear errors.

Used by training checkpoints and by the conversion tools. A checkpoint is written into
``<dir>.incomplete`` and renamed to ``<dir>`` by rank 0 once every rank has finished, so a crash never
leaves a directory that looks complete. torch_dist checkpoints are resharding-agnostic: a checkpoint
saved at one TP/PP loads at another.

Trap handled here (../shared/MCORE_ON_CPU.md): megatron's filesystem writer creates its results queue
through a *spawn*-context ``multiprocessing.Manager`` on first use, which costs ~3 s per process and
hangs in scripts without a ``__main__`` guard. Our saves are synchronous (the writer runs in the saving
process), so an in-process ``queue.Queue`` is all it needs: instant, no server process. (An async save
from a forked writer would need a process-shared queue; this project does not use async saves.)
"""
from __future__ import annotations

import os
import queue
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

COMPLETE_MARKER = "qvgen_complete"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the model that loads it."""


def _install_fast_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def save_sharded(sharded_state_dict: Dict[str, Any], path: str, overwrite: bool = False) -> None:
    """Collective: every rank calls it with its own sharded state dict."""
    from megatron.core import dist_checkpointing

    _install_fast_results_queue()
    path = os.path.abspath(path)
    staging = path + ".incomplete"
    if _rank() == 0:
        if os.path.exists(path) and not overwrite:
            raise CheckpointError(f"refusing to overwrite the existing checkpoint {path}")
        if os.path.exists(staging):  # our own leftover from a crashed save
            shutil.rmtree(staging)
        os.makedirs(staging)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, staging)
    _barrier()
    if _rank() == 0:
        with open(os.path.join(staging, COMPLETE_MARKER), "w") as f:
            f.write("ok\n")
        if os.path.exists(path):
            old = path + ".replaced"
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    _barrier()


def load_sharded(sharded_state_dict: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Collective load of the tensors ``sharded_state_dict`` asks for; errors name what is wrong."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory at {path}")
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete qvgen checkpoint (no {COMPLETE_MARKER} marker: "
                              "an interrupted save, or not written by megatron-qvgen)")
    try:
        return dist_checkpointing.load(sharded_state_dict, path, strict=StrictHandling.RAISE_UNEXPECTED)
    except (KeyboardInterrupt, SystemExit, CheckpointError):
        raise
    except BaseException as exc:  # torch DCP's CheckpointException derives from BaseException
        raise CheckpointError(f"checkpoint {path} does not match the model being loaded: {_last_line(exc)}") from exc


def _last_line(exc: BaseException) -> str:
    """torch DCP wraps the real reason in per-rank tracebacks: keep the last non-empty line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[-1] if lines else type(exc).__name__
    return line if len(line) <= 600 else line[:600] + f" ... ({len(line) - 600} more characters)"


def load_common(path: str) -> Optional[Dict[str, Any]]:
    """The non-sharded part (saved by rank 0): configs, counters. weights_only loading."""
    from megatron.core import dist_checkpointing

    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete qvgen checkpoint")
    return dist_checkpointing.load_common_state_dict(path)


def state_dict_to_cpu(sd: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in sd.items()}
