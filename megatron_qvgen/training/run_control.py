"""When a run saves or stops outside its step cadence, and how it tells the launcher why it ended.

Signals: SIGUSR1 (SLURM's ``--signal`` before the time limit) and SIGTERM (pre-emption, ``scancel``, the
time limit itself) only set a flag, from the first line of set-up on, so a signal during set-up, a step
or a save is never fatal: the run finishes what it is doing, saves (unless the newest state is already
saved) and stops.

Time: rank 0's clock alone decides the time-based save (``train.save_interval_minutes``) and the
run-duration stop (``train.exit_after_minutes``): every rank's signal flag and rank 0's decisions are
combined by one all-reduce per step, so all ranks act on the same step. The stop comes when another step
plus a save (the slowest step and the last save so far, measured) would end past the limit.

Exit status of ``python -m megatron_qvgen.train`` (one process per rank):
  0   finished: train.steps reached and saved, or the run directory already holds the final checkpoint;
  75  stopped before train.steps with a complete checkpoint of the last step (EX_TEMPFAIL: run the same
      command again, e.g. requeue the job, and it continues);
  other: an error (the newest complete checkpoint is untouched).
Rank 0's last line on stdout says the same in words (``qvgen: finished ...`` / ``qvgen: stopped ...``).
torchrun reports any non-zero worker status as its own 1: launchers that need the distinction start the
ranks with srun (launch/slurm_wan14b.sbatch) or read that line.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

EXIT_FINISHED = 0
EXIT_STOPPED = 75
FINISHED_MARKER = "finished.json"   # in a study run's checkpoint folder once that run went on to its record
# Time a rank needs after its last save to leave (flush logs, tear down process groups), in seconds.
EXIT_MARGIN_S = 60.0


class StopSignals:
    """SIGTERM / SIGUSR1 ask the run to checkpoint and stop after what it is doing."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int = 0
        self._previous = {}

    def install(self) -> "StopSignals":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = self.received or signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass(frozen=True)
class Decision:
    stop: Optional[str] = None   # why the run stops now, or None
    save: bool = False           # a time-based save is due


class RunClock:
    """Rank 0's clock and every rank's signals, agreed across ranks once per step (:meth:`poll`)."""

    def __init__(self, save_interval_minutes: float, exit_after_minutes: float, signals: StopSignals,
                 started: float, is_rank0: bool):
        self.save_interval_s = 60.0 * save_interval_minutes
        self.exit_after_s = 60.0 * exit_after_minutes
        self.signals = signals
        self.started = started
        self.last_save = time.monotonic()
        self.is_rank0 = is_rank0
        self.slowest_step_s = 0.0
        self.last_save_s = 0.0

    def step_took(self, seconds: float) -> None:
        self.slowest_step_s = max(self.slowest_step_s, seconds)

    def save_took(self, seconds: float) -> None:
        self.last_save_s = seconds
        self.last_save = time.monotonic()

    def signal_lead_needed_s(self) -> float:
        """How long before the time limit a stop signal must arrive: a step, a save and the exit."""
        return self.slowest_step_s + self.last_save_s + EXIT_MARGIN_S

    def _rank0_due(self):
        now = time.monotonic()
        save = bool(self.save_interval_s) and now - self.last_save >= self.save_interval_s
        # stop now if one more step and its save would complete after the limit
        stop = bool(self.exit_after_s) and (now - self.started) + self.slowest_step_s + self.last_save_s \
            >= self.exit_after_s
        return save, stop

    def poll(self) -> Decision:
        """Collective: the same decision on every rank."""
        save, stop = self._rank0_due() if self.is_rank0 else (False, False)
        flags = torch.tensor([float(self.signals.received), float(save), float(stop)],
                             device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, save, stop = int(flags[0].item()), bool(flags[1].item()), bool(flags[2].item())
        if signum:
            return Decision(stop=signal.Signals(signum).name)
        if stop:
            return Decision(stop=f"train.exit_after_minutes={self.exit_after_s / 60:g} reached")
        return Decision(save=save)


@dataclass(frozen=True)
class RunOutcome:
    kind: str                          # "finished" | "complete" | "stopped"
    step: int
    total: int
    checkpoint: Optional[str] = None   # the complete checkpoint a rerun continues from
    reason: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_STOPPED if self.kind == "stopped" else EXIT_FINISHED

    def line(self) -> str:
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "nothing saved"
        if self.kind == "finished":
            return f"qvgen: finished: step {self.step}/{self.total}, {where}"
        if self.kind == "complete":
            return (f"qvgen: run complete: {where} is at step {self.step} of train.steps={self.total}; nothing "
                    "to do (raise --train.steps to continue it, or start a new run with another --train.save_dir)")
        again = "a rerun continues from it" if self.checkpoint else "a rerun starts over"
        return (f"qvgen: stopped to be requeued ({self.reason}): step {self.step}/{self.total}, {where}; {again} "
                f"(exit status {EXIT_STOPPED})")
