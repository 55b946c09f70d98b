"""Training checkpoints: the QAT student, its optimizer and schedule, the step (which fixes the rank-decay
state), the data position and every rank's RNG -- never the teacher.

Layout: ``<save_dir>/iter_<step>/`` is a megatron dist checkpoint (torch_dist: it reloads at another
TP/PP), written under a temporary name and renamed when complete (megatron_qvgen.dist_ckpt);
``<save_dir>/latest`` names the newest complete one and is replaced atomically after it. Per-rank RNG
states are restored only when the parallel layout is unchanged (the noise of a step never depends on
them: it is drawn from a generator seeded by the step).

SIGTERM / SIGUSR1 (SLURM preemption) only set a flag; the loop checks it between steps, agrees on it
across ranks, saves and exits cleanly.
"""
from __future__ import annotations

import os
import random
import signal
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_qvgen.dist_ckpt import CheckpointError, is_complete, load_common, load_sharded, save_sharded
from megatron_qvgen.training.optimizer_checkpoint import load_optimizer_state, optimizer_sharded_state

LATEST = "latest"


def iteration_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"iter_{step:07d}")


def latest_checkpoint(load_dir: str) -> Optional[str]:
    """The newest complete checkpoint under ``load_dir`` (or ``load_dir`` itself if it is one)."""
    if load_dir is None or not os.path.isdir(load_dir):
        return None
    if is_complete(load_dir):
        return load_dir
    pointer = os.path.join(load_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(load_dir, name)
    if not is_complete(path):
        raise CheckpointError(f"{pointer} names {name}, which is not a complete checkpoint")
    return path


def _write_latest(save_dir: str, step: int) -> None:
    tmp = os.path.join(save_dir, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(os.path.basename(iteration_dir(save_dir, step)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, LATEST))


def _layout():
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size())


def _rng_object(is_loading: bool):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = None if is_loading else {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp, dp = _layout()
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, (pp, tp, dp), offset, replica_id=0)


def _restore_rng(state) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _raw(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper: checkpoint keys are the model's own (as the converter writes them)."""
    return getattr(chunk, "module", chunk)


def _model_state(chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    if len(chunks) == 1:
        return {"model": _raw(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _raw(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _model_sharded_union(model_state: Dict[str, Any]) -> Dict[str, Any]:
    merged = {}
    for value in model_state.values():
        merged.update(value)
    return merged


def save_checkpoint(save_dir: str, step: int, chunks, optimizer, scheduler, common: Dict[str, Any],
                    model_cfg=None) -> str:
    """Collective. ``common``: JSON-like values saved once (config, data position, counters).
    ``model_cfg`` is recorded the way the conversion tools read it, so they take training checkpoints too."""
    from megatron_qvgen.convert.checkpoint_io import content_metadata

    path = iteration_dir(save_dir, step)
    state = _model_state(chunks)
    if model_cfg is not None:
        state.update(content_metadata(model_cfg))
    state["optimizer"] = optimizer_sharded_state(optimizer, _model_sharded_union(state))
    state["rng_state"] = _rng_object(is_loading=False)
    state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    state["layout"] = list(_layout())
    state["common"] = common
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
    save_sharded(state, path, overwrite=True)
    if dist.get_rank() == 0:
        _write_latest(save_dir, step)
    dist.barrier()
    return path


def holds_aux_factors(path: str) -> bool:
    """Whether the student in this checkpoint still has auxiliary factors (rank decay not yet at 0)."""
    from megatron_qvgen.convert.checkpoint_io import checkpoint_shapes

    return any(k.endswith(".aux_L") and not k.startswith("optimizer") for k in checkpoint_shapes(path))


def read_common(path: str) -> Dict[str, Any]:
    """step, scheduler, layout, common (no tensors of the model): decides how to build before loading."""
    return load_common(path)


def load_checkpoint(path: str, chunks, optimizer, scheduler) -> Dict[str, Any]:
    """Collective. Loads model, optimizer, schedule (and RNG if the layout matches); returns the common part."""
    common = read_common(path)
    same_layout = tuple(common.get("layout", ())) == _layout()
    request = _model_state(chunks)
    request["optimizer"] = optimizer_sharded_state(optimizer, _model_sharded_union(request), is_loading=True)
    if same_layout:
        request["rng_state"] = _rng_object(is_loading=True)
    loaded = load_sharded(request, path)
    for key, chunk in zip(sorted(k for k in loaded if k.startswith("model")), chunks):
        _raw(chunk).load_state_dict(loaded[key])
    load_optimizer_state(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout and "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return common


class PreemptionFlag:
    """SIGTERM / SIGUSR1 ask the run to checkpoint and stop after the current step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        flag = torch.tensor([1.0 if self.requested else 0.0],
                            device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def list_checkpoints(save_dir: str) -> List[str]:
    if not os.path.isdir(save_dir):
        return []
    return sorted(d for d in os.listdir(save_dir) if d.startswith("iter_") and is_complete(os.path.join(save_dir, d)))
