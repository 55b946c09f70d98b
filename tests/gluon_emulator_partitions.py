"""How tests/gluon_emulator.py runs the partitions of ``gl.warp_specialize``: threads that take turns."""
from __future__ import annotations

import random
import threading

from tests.gluon_emulator_state import GluonEmulationError

JOIN_TIMEOUT_S = 600

class _PartitionState:
    """What each warp-specialized partition has of its own: its products in flight and its warp groups."""

    def __init__(self, warp_groups: int, name: str = "the program"):
        self.warp_groups, self.name = warp_groups, name
        self.outstanding = []
        self.seen = {}       # barrier -> phases completed when this partition last waited on it


class _Abort(BaseException):
    """Unwinds a partition thread after another one failed."""


class _Scheduler:
    """Runs partitions one at a time (a baton), handing it on at synchronisation points by a seeded random choice
    among the partitions that can run; none can, and not all have finished: a hang."""

    def __init__(self, seed: int):
        self.cv = threading.Condition()
        self.rng = random.Random(seed)
        self.me = threading.local()
        self.turn = None
        self.waiting, self.what, self.finished = {}, {}, set()
        self.error = None

    def run(self, bodies) -> None:
        self.waiting = {i: None for i in range(len(bodies))}
        threads = [threading.Thread(target=self._thread, args=(i, body), daemon=True) for i, body in enumerate(bodies)]
        self.turn = self.rng.randrange(len(bodies))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=JOIN_TIMEOUT_S)
            if t.is_alive():
                raise GluonEmulationError(f"a partition ran {JOIN_TIMEOUT_S} s without reaching a synchronisation "
                                          "point")
        if self.error is not None:
            raise self.error

    def _thread(self, i, body):
        self.me.i = i
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i or self.error is not None)
        try:
            if self.error is None:
                body()
        except _Abort:
            pass
        except BaseException as e:            # noqa: B902 - handed to the launching thread
            with self.cv:
                self.error = self.error or e
        with self.cv:
            self.finished.add(i)
            self._pass()

    def _pass(self):
        """Choose who runs next (the caller holds the lock)."""
        if self.error is None:
            ready = [j for j, wait in self.waiting.items()
                     if j not in self.finished and (wait is None or wait())]
            if ready:
                self.turn = self.rng.choice(ready)
            elif len(self.finished) < len(self.waiting):
                self.error = GluonEmulationError("hang: every partition waits on a phase that cannot complete: "
                                                 + "; ".join(f"partition {j}: {self.what[j]}"
                                                             for j in self.waiting if j not in self.finished))
        self.cv.notify_all()

    def block_until(self, ready, what: str) -> None:
        """Hand the baton on, and take it back once ``ready()`` holds (a synchronisation point when it holds now)."""
        i = self.me.i
        with self.cv:
            self.waiting[i], self.what[i] = ready, what
            self._pass()
            self.cv.wait_for(lambda: self.turn == i or self.error is not None)
            self.waiting[i] = None
            if self.error is not None:
                raise _Abort()

    def switch(self) -> None:
        self.block_until(lambda: True, "running")
