"""One writer per run directory: ``<save_dir>/run.lock`` names the host, SLURM job id and pid holding it.

Two jobs writing one run directory (a resubmitted job while the first still runs, two users sharing a
path) interleave checkpoints and ``latest`` silently. The lock is created exclusively (``O_EXCL``) by
global rank 0 at start-up and removed when the run ends. A lock left behind by a killed job is *stale*:

- same SLURM job id as ours: SLURM runs one instance of a job at a time, so it is our own earlier run
  before a requeue -- taken over;
- same host and the pid is not running -- taken over;
- otherwise it cannot be told from a live writer on another node: the run is refused with a line naming
  the holder; after checking that job is gone, ``--train.break_lock true`` takes it over.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Dict, Optional

from megatron_qvgen.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirectoryLocked(ConfigError):
    """Another job holds this run directory."""


def _identity() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "job_id": os.environ.get("SLURM_JOB_ID"), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(holder: Dict[str, Any], me: Dict[str, Any]) -> Optional[str]:
    """Why ``holder`` is known to be gone, or None if it may still be writing."""
    if holder.get("job_id") and holder.get("job_id") == me.get("job_id"):
        return f"it is this job's ({me['job_id']}) earlier run, before a requeue"
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_running(holder["pid"]):
        return f"pid {holder['pid']} is not running on {me['host']}"
    return None


def _describe(holder: Dict[str, Any]) -> str:
    job = f"job {holder['job_id']}, " if holder.get("job_id") else ""
    return f"{job}host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


class RunLock:
    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK_NAME)
        self.me = _identity()
        self.held = False
        self.created_dir = not os.path.isdir(save_dir)

    def acquire(self, break_lock: bool = False) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read()
                if holder is None:          # removed or half-written meanwhile: try again
                    time.sleep(0.2)
                    continue
                reason = stale_reason(holder, self.me)
                if reason is None and not break_lock:
                    raise RunDirectoryLocked(
                        f"{os.path.dirname(self.path)} is in use by {_describe(holder)} ({self.path}); one job "
                        "writes a run directory at a time. If that job is gone, rerun with --train.break_lock true")
                log.warning("taking over the run directory lock of %s: %s", _describe(holder),
                            reason or "--train.break_lock true")
                self._replace()
                return self
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return self
        raise RunDirectoryLocked(f"could not create {self.path}: it keeps appearing and vanishing")

    def _replace(self) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.me, f)
        os.replace(tmp, self.path)
        self.held = True

    def read(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def release(self, remove_created_dir: bool = False) -> None:
        """Remove the lock if it is still ours (and the run directory, if we created it and it is empty)."""
        if not self.held:
            return
        holder = self.read()
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            os.remove(self.path)
        self.held = False
        if remove_created_dir and self.created_dir:
            try:
                os.rmdir(os.path.dirname(self.path))
            except OSError:
                pass
