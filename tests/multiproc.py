"""Run a function in N real processes joined by a gloo group, from inside pytest.

The parent has already imported torch and megatron-core; each call forks N children that join a fresh
gloo group over a FileStore, run ``fn(rank, world_size, *args)``, write the return value with
``torch.save`` (read back with ``weights_only=True``) and leave with ``os._exit``. A child's exception
comes back to the parent with its traceback; a hang is killed after ``timeout`` seconds.
"""
from __future__ import annotations

import datetime
import os
import signal
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist


class DistributedTestError(AssertionError):
    pass


def _child(rank: int, world_size: int, workdir: str, fn: Callable, args, kwargs) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
        store = dist.FileStore(os.path.join(workdir, "store"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        result = fn(rank, world_size, *args, **kwargs)
        torch.save(result, os.path.join(workdir, f"result_{rank}.pt"))
        try:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
        except Exception:  # noqa: BLE001 - best effort; the process exits next
            pass
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(workdir, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    finally:
        os._exit(code)


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300.0, **kwargs) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` processes; return per-rank results."""
    with tempfile.TemporaryDirectory(prefix="qvgen_dist_") as workdir:
        pids = []
        for rank in range(world_size):
            pid = os.fork()
            if pid == 0:
                _child(rank, world_size, workdir, fn, args, kwargs)
            pids.append(pid)
        deadline = time.monotonic() + timeout
        status = {}
        while len(status) < world_size:
            for rank, pid in enumerate(pids):
                if rank in status:
                    continue
                done, code = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[rank] = code
            if time.monotonic() > deadline:
                for rank, pid in enumerate(pids):
                    if rank not in status:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                raise DistributedTestError(f"{fn.__name__} timed out after {timeout}s at world size {world_size}"
                                           + _errors(workdir, world_size))
            if len(status) < world_size:
                time.sleep(0.01)
        if any(code != 0 for code in status.values()):
            raise DistributedTestError(f"{fn.__name__} failed at world size {world_size}" + _errors(workdir, world_size))
        return [torch.load(os.path.join(workdir, f"result_{r}.pt"), weights_only=True) for r in range(world_size)]


def _errors(workdir: str, world_size: int) -> str:
    out = []
    for rank in range(world_size):
        path = os.path.join(workdir, f"error_{rank}.txt")
        if os.path.exists(path):
            with open(path) as f:
                out.append(f"\n--- rank {rank} ---\n{f.read()}")
    return "".join(out)
