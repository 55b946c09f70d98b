"""Opening a run directory at start-up: who writes it, where the run continues from, whether it may.

Collective; global rank 0 does the file work and broadcasts the result (or the error) to every rank, so
all ranks start, or refuse, together. In order:

1. lock ``train.save_dir`` (training/run_lock.py) -- one writer per run directory;
2. the checkpoint to start from: this run's own newest complete checkpoint first (a requeued job must
   continue its own work); ``train.load_dir`` only when ``save_dir`` holds none, i.e. to start a run;
3. compare that checkpoint's run config with this one (training/run_config_check.py): refused changes
   raise here, before anything is written, and the lock is released;
4. a run already at ``train.steps`` is complete: nothing else happens;
5. otherwise remove the temporary folders of saves a killed job never completed (training/retention.py).
Without ``train.save_dir`` it warns once that nothing will be saved.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_qvgen.config import ConfigError, ExperimentConfig
from megatron_qvgen.training import checkpointing as ckpt
from megatron_qvgen.training.retention import remove_stale_saves
from megatron_qvgen.training.run_config_check import plan_resume
from megatron_qvgen.training.run_lock import RunLock

log = logging.getLogger(__name__)


@dataclass
class RunStart:
    cfg: ExperimentConfig
    resume: Optional[str] = None      # checkpoint to load, or None for a fresh start
    own: bool = False                 # it is this run directory's (False: from train.load_dir)
    step: int = 0                     # its step
    complete: bool = False            # already at train.steps: nothing to do
    lock: Optional[RunLock] = None    # held by global rank 0 only


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _start_point(cfg: ExperimentConfig):
    """(checkpoint, own) on rank 0."""
    t = cfg.train
    own = ckpt.latest_checkpoint(t.save_dir) if t.save_dir else None
    if own is not None:
        if t.load_dir and not _same_dir(t.load_dir, t.save_dir):
            log.info("continuing this run from its own checkpoint %s (train.load_dir %s only starts a run whose "
                     "train.save_dir holds no checkpoint)", own, t.load_dir)
        return own, True
    if t.load_dir and not _same_dir(t.load_dir, t.save_dir):
        start = ckpt.latest_checkpoint(t.load_dir)
        if start is None:
            raise ConfigError(f"train.load_dir {t.load_dir} holds no complete checkpoint")
        log.info("starting this run from %s (train.load_dir)", start)
        return start, False
    return None, False


def _open_on_rank0(cfg: ExperimentConfig) -> RunStart:
    t = cfg.train
    lock = RunLock(t.save_dir).acquire(t.break_lock) if t.save_dir else None
    try:
        resume, own = _start_point(cfg)
        start = RunStart(cfg, resume=resume, own=own, lock=lock)
        if resume is not None:
            common = ckpt.read_common(resume)
            start.step = int(common["step"])
            plan = plan_resume(common.get("common", {}).get("config"), cfg, start.step, resume, own)
            for note in plan.notes:
                log.warning(note)
            start.cfg, start.complete = plan.cfg, plan.complete
        if not t.save_dir:
            log.warning("train.save_dir is not set: nothing of this run will be saved")
        elif not start.complete:
            remove_stale_saves(t.save_dir)
        return start
    except BaseException:
        if lock is not None:
            lock.release(remove_created_dir=True)
        raise


def _picklable(obj) -> bool:
    import pickle

    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001
        return False


def open_run_directory(cfg: ExperimentConfig) -> RunStart:
    """Collective: the same :class:`RunStart` (or the same error) on every rank."""
    rank = dist.get_rank()
    payload = [None]
    if rank == 0:
        try:
            payload[0] = _open_on_rank0(cfg)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            payload[0] = exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}")
            if payload[0] is not exc:
                dist.broadcast_object_list(payload, src=0)
                raise
    dist.broadcast_object_list(payload, src=0)
    result = payload[0]
    if isinstance(result, BaseException):
        raise result
    if rank != 0:
        result.lock = None
    return result
