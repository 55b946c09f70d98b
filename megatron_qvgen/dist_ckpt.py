"""megatron dist_checkpointing (torch_dist) with atomic directories and clear errors.

Used by training checkpoints and by the conversion tools. A checkpoint is written into
``<dir>.incomplete`` and renamed to ``<dir>`` by rank 0 once every rank has finished, so a crash never
leaves a directory that looks complete. torch_dist checkpoints are resharding-agnostic: a checkpoint
saved at one TP/PP loads at another.

Saves can be spread over the data-parallel ranks (megatron's ``FullyParallelSaveStrategyWrapper``: each
tensor replicated over DP is written by one of its replicas, not all by DP rank 0) and run in the
background (megatron's async save: a forked process writes a copy-on-write snapshot of the tensors while
training continues; :class:`AsyncSaves` completes them).

Trap handled here (../shared/MCORE_ON_CPU.md): megatron's filesystem writer creates its results queue
through a *spawn*-context ``multiprocessing.Manager`` on first use, which costs ~3 s per process and
hangs in scripts without a ``__main__`` guard. A synchronous save writes in the saving process, so an
in-process ``queue.Queue`` is all it needs; an async save's writer is a forked process, so its results
come back through a *fork*-context Manager queue (~0.1 s, shut down by :meth:`AsyncSaves.close`).
"""
from __future__ import annotations

import os
import queue
import shutil
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

COMPLETE_MARKER = "qvgen_complete"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the model that loads it."""


def _install_fast_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def save_strategy(fully_parallel_group=None):
    """torch_dist, wrapped so that ``fully_parallel_group``'s ranks share the writing of the tensors they
    replicate (None: plain torch_dist)."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    strategy = get_default_save_sharded_strategy("torch_dist")
    if fully_parallel_group is None:
        return strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    # no cached distribution: the state dict changes when rank decay removes the auxiliary factors
    return FullyParallelSaveStrategyWrapper(strategy, fully_parallel_group, do_cache_distribution=False)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def save_sharded(sharded_state_dict: Dict[str, Any], path: str, overwrite: bool = False, strategy=None,
                 async_saves: Optional["AsyncSaves"] = None, on_complete: Optional[Callable[[], None]] = None) -> None:
    """Collective: every rank calls it with its own sharded state dict.

    ``on_complete`` runs on every rank (collectively) once ``path`` is complete. With ``async_saves`` the
    tensors are written in the background: this returns once they are snapshotted, and the completion
    (marker, rename, ``on_complete``) happens when :meth:`AsyncSaves.poll` finds every rank done."""
    from megatron.core import dist_checkpointing

    if async_saves is None:
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

    def complete() -> None:
        _barrier()
        if _rank() == 0:
            _mark_and_rename(staging, path)
        _barrier()
        if on_complete is not None:
            on_complete()

    request = dist_checkpointing.save(sharded_state_dict, staging, sharded_strategy=strategy,
                                      async_sharded_save=async_saves is not None)
    if request is None:
        complete()
    else:
        request.add_finalize_fn(complete)
        async_saves.schedule(request)


def _mark_and_rename(staging: str, path: str) -> None:
    with open(os.path.join(staging, COMPLETE_MARKER), "w") as f:
        f.write("ok\n")
    if os.path.exists(path):
        old = path + ".replaced"
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old)
    else:
        os.replace(staging, path)


class AsyncSaves:
    """megatron's queue of background saves: :meth:`poll` completes the finished ones (collective, call it
    on every rank at the same points), :meth:`close` waits for all of them."""

    def __init__(self):
        import multiprocessing

        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._manager = None
        if hasattr(filesystem_async, "_results_queue"):   # megatron-core's own writer (0.16); see module doc
            self._manager = multiprocessing.get_context("fork").Manager()
            filesystem_async._results_queue = self._manager.Queue()
        self._queue = AsyncCallsQueue(persistent=False)

    def schedule(self, request) -> None:
        self._queue.schedule_async_request(request)

    def poll(self) -> List[int]:
        return self._queue.maybe_finalize_async_calls(blocking=False)

    def close(self) -> None:
        """Complete what is pending (collective), then stop the results queue's server process."""
        try:
            self._queue.close()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the results queue's server process without completing anything (no collective: for an
        error path, where the pending saves stay ``.incomplete`` and the next start removes them)."""
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if self._manager is not None:
            filesystem_async._results_queue = None
            self._manager.shutdown()
            self._manager = None


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
