"""Training checkpoints: the QAT student, its optimizer and schedule, the step (which fixes the rank-decay
state), the data position and every rank's RNG -- never the teacher.

Layout: ``<save_dir>/iter_<step>/`` is a megatron dist checkpoint (torch_dist: it reloads at another
TP/PP), written under a temporary name and renamed when complete (megatron_qvgen.dist_ckpt);
``<save_dir>/latest`` names the newest complete one and is replaced atomically after it; then older
checkpoints beyond ``train.keep_last`` are deleted (training/retention.py). A ``latest`` that names a
missing or incomplete folder falls back to the newest complete one, with a warning. Per-rank RNG states
are restored only when the parallel layout is unchanged (the noise of a step never depends on them: it
is drawn from a generator seeded by the step).

On load, the model, the optimizer's state and the schedule's *position* come from the checkpoint; the
hyper-parameters (learning rates, schedule length, Adam settings) are the current config's, so a run
extended with a larger ``train.steps`` follows a schedule of the new length (megatron's scheduler would
keep the checkpoint's total: lr 0 for every step past the old end).
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_qvgen.dist_ckpt import CheckpointError, is_complete, load_common, load_sharded, save_sharded
from megatron_qvgen.training.optimizer_checkpoint import load_optimizer_state, optimizer_sharded_state
from megatron_qvgen.training.retention import complete_checkpoints, prune

log = logging.getLogger(__name__)

LATEST = "latest"


def iteration_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"iter_{step:07d}")


def latest_checkpoint(load_dir: str) -> Optional[str]:
    """The checkpoint to continue from: ``load_dir`` itself if it is one, else the one ``<load_dir>/latest``
    names, else (``latest`` missing, or naming a missing or incomplete folder) the newest complete
    ``iter_*`` -- saying so. None when there is none."""
    if load_dir is None or not os.path.isdir(load_dir):
        return None
    if is_complete(load_dir):
        return load_dir
    pointer = os.path.join(load_dir, LATEST)
    name = None
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if name and is_complete(os.path.join(load_dir, name)):
            return os.path.join(load_dir, name)
    found = complete_checkpoints(load_dir)
    if name is not None or found:
        problem = (f"{pointer} names {name}, which is " + ("missing" if not os.path.exists(os.path.join(load_dir, name))
                                                           else "not a complete checkpoint")
                   if name else f"{load_dir} has no {LATEST} file")
        _warn_rank0(f"{problem}; " + (f"using the newest complete checkpoint, {found[-1]}" if found
                                      else "and holds no complete checkpoint"))
    return os.path.join(load_dir, found[-1]) if found else None


def _warn_rank0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning(message)


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
                    model_cfg=None, keep_last: int = 0, strategy=None, async_saves=None,
                    on_complete=None) -> str:
    """Collective. ``common``: JSON-like values saved once (config, data position, counters).
    ``model_cfg`` is recorded the way the conversion tools read it, so they take training checkpoints too.
    Once the checkpoint is complete, ``latest`` names it, retention keeps ``keep_last`` (0 = all) and
    ``on_complete(path)`` runs on every rank. ``strategy`` / ``async_saves``: see megatron_qvgen.dist_ckpt."""
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

    def completed() -> None:
        if dist.get_rank() == 0:
            _write_latest(save_dir, step)
            prune(save_dir, keep_last, os.path.basename(path), step)
        dist.barrier()
        if on_complete is not None:
            on_complete(path)

    save_sharded(state, path, overwrite=True, strategy=strategy, async_saves=async_saves, on_complete=completed)
    return path


def holds_aux_factors(path: str) -> bool:
    """Whether the student in this checkpoint still has auxiliary factors (rank decay not yet at 0)."""
    from megatron_qvgen.convert.checkpoint_io import checkpoint_shapes

    return any(k.endswith(".aux_L") and not k.startswith("optimizer") for k in checkpoint_shapes(path))


def read_common(path: str) -> Dict[str, Any]:
    """step, scheduler, layout, common (no tensors of the model): decides how to build before loading."""
    return load_common(path)


def load_checkpoint(path: str, chunks, optimizer, scheduler) -> Dict[str, Any]:
    """Collective. Loads model, optimizer state, the schedule's position (and RNG if the layout matches);
    returns the common part. Hyper-parameters stay the current config's (module docstring)."""
    common = read_common(path)
    same_layout = tuple(common.get("layout", ())) == _layout()
    request = _model_state(chunks)
    request["optimizer"] = optimizer_sharded_state(optimizer, _model_sharded_union(request), is_loading=True)
    if same_layout:
        request["rng_state"] = _rng_object(is_loading=True)
    loaded = load_sharded(request, path)
    for key, chunk in zip(sorted(k for k in loaded if k.startswith("model")), chunks):
        _raw(chunk).load_state_dict(loaded[key])
    # torch's load restores the saved hyper-parameters; this run's (a longer schedule) win. Adam's step count
    # is state, not configuration: it stays as loaded.
    configured = [{k: v for k, v in group.items() if k not in ("params", "step")} for group in optimizer.param_groups]
    load_optimizer_state(optimizer, loaded["optimizer"])
    for group, hyper in zip(optimizer.param_groups, configured):
        group.update(hyper)
    restore_schedule(scheduler, common["scheduler"])
    if same_layout and "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return common


def restore_schedule(scheduler, saved: Dict[str, Any]) -> None:
    """Put megatron's ``OptimizerParamScheduler`` (built from the current config) at the saved position.

    Its own ``load_state_dict`` would take the checkpoint's lr, warm-up and decay length by default: a run
    extended from 60 to 120 steps would then train steps 61-120 at the end-of-schedule lr (0)."""
    scheduler.num_steps = 0
    scheduler.step(increment=int(saved["num_steps"]))
