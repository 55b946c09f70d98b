"""benchmarks/fidelity/run_study.py under a deadline: the lent GPU runs a command for at most ten minutes, so the
study must stop cleanly inside a call and continue in the next one. Real processes (sleeping Python runs that
write their record as a study run does, at the end)."""
import sys
import time
from pathlib import Path

import pytest

from scripts import load_script


def _runner():
    return load_script("benchmarks/fidelity/run_study.py")


def _queue(folder: Path, seconds):
    """One run per entry: sleeps, then writes its JSON record (nothing if it is stopped first)."""
    return [(folder / f"run{i}.json", [sys.executable, "-c",
                                       f"import time, pathlib; time.sleep({s}); "
                                       f"pathlib.Path({str(folder / f'run{i}.json')!r}).write_text('{{}}')"])
            for i, s in enumerate(seconds)]


def test_without_a_deadline_every_run_finishes(tmp_path):
    failed, left = _runner().run_queue(_queue(tmp_path, [0.1, 0.1, 0.1]), jobs=2)
    assert failed == [] and left == []
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["run0.json", "run1.json", "run2.json"]


def test_a_deadline_stops_the_runs_still_going_and_leaves_them_for_the_next_call(tmp_path):
    # run0 (0.5 s) and run1 (30 s) start together; within ~2 s run0 is done and run2 starts (its estimate, run0's
    # time, fits before 8 s); at the 8 s deadline run1 and run2 are stopped without a record; run3 never starts.
    start = time.perf_counter()
    failed, left = _runner().run_queue(_queue(tmp_path, [0.5, 30, 30, 30]), jobs=2, deadline=8)
    took = time.perf_counter() - start
    assert failed == [] and left == ["run1", "run2", "run3"]
    assert [p.name for p in tmp_path.glob("*.json")] == ["run0.json"]
    assert (tmp_path / "run2.log").exists() and not (tmp_path / "run3.log").exists()
    assert took < 20, took


def test_no_run_starts_that_the_finished_ones_say_cannot_end_in_time(tmp_path):
    # Each run takes 1.5 s; the first two (started together) are seen done at ~2 s (the runner looks once a
    # second), and no third one starts, since 2 s + 2 s > 3.5 s: it is left for the next call, nothing is stopped.
    failed, left = _runner().run_queue(_queue(tmp_path, [1.5, 1.5, 1.5]), jobs=2, deadline=3.5)
    assert failed == [] and left == ["run2"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["run0.json", "run1.json"]
    assert not (tmp_path / "run2.log").exists()


def _on_sigterm(folder: Path, name: str, then: str):
    """A run that sleeps until SIGTERM, then does ``then``: what a study run does at the deadline."""
    return (folder / f"{name}.json", [sys.executable, "-c",
                                      "import signal, sys, time, pathlib\n"
                                      f"path = pathlib.Path({str(folder / (name + '.json'))!r})\n"
                                      f"def stop(*_):\n    {then}\n"
                                      "signal.signal(signal.SIGTERM, stop)\ntime.sleep(60)\n"])


def test_at_the_deadline_each_run_counts_by_how_it_ended(tmp_path):
    # measuring: writes its record, exit 0 (done); training: saves, exit 75 (next call); broken: exit 2 (failed)
    queue = [_on_sigterm(tmp_path, "measuring", "path.write_text('{}'); sys.exit(0)"),
             _on_sigterm(tmp_path, "training", "sys.exit(75)"),
             _on_sigterm(tmp_path, "broken", "sys.exit(2)")]
    (tmp_path / "training.log").write_text("the earlier call's log\n")
    failed, left = _runner().run_queue(queue, jobs=3, deadline=2)
    assert failed == ["broken.json"] and left == ["training"]
    assert [p.name for p in tmp_path.glob("*.json")] == ["measuring.json"]
    assert (tmp_path / "training.log").read_text().startswith("the earlier call's log\n---")   # appended


def _recording_starts(runner, monkeypatch):
    """The processes the runner starts, in order."""
    started = []
    popen = runner.subprocess.Popen

    def recording(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(runner.subprocess, "Popen", recording)
    return started


def test_an_error_in_the_runner_leaves_no_run_going(tmp_path, monkeypatch):
    runner = _runner()
    started = _recording_starts(runner, monkeypatch)

    def interrupted(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_queue(_queue(tmp_path, [30, 30]), jobs=2)
    assert len(started) == 2 and all(p.poll() is not None for p in started)


def test_a_run_that_can_continue_starts_while_a_little_time_is_left(tmp_path):
    # run0 takes ~3 s; at ~4 s a run expected to take as long would not end before the 6 s deadline, but run2
    # (--resume-dir: what it trains is kept for the next call) starts anyway and is stopped at 6 s; run1 waits.
    queue = _queue(tmp_path, [3, 30, 30])
    queue[2] = (queue[2][0], queue[2][1] + ["--resume-dir", str(tmp_path / "resume")])
    queue = [queue[0], queue[2], queue[1]]
    failed, left = _runner().run_queue(list(queue), jobs=1, deadline=6, min_start_s=1)
    assert failed == [] and left == ["run2", "run1"]
    assert (tmp_path / "run2.log").exists() and not (tmp_path / "run1.log").exists()


def test_a_sigterm_to_the_runner_stops_its_runs_first(tmp_path, monkeypatch):
    import os
    import signal
    import threading

    runner = _runner()
    started = _recording_starts(runner, monkeypatch)
    queue = [_on_sigterm(tmp_path, "training", "sys.exit(75)"), *_queue(tmp_path, [30])]
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        runner.run_queue(queue, jobs=2)
    assert stop.value.code == 128 + signal.SIGTERM
    assert len(started) == 2 and all(p.poll() is not None for p in started)
    assert started[0].returncode == 75          # the training run had its SIGTERM: it saved and stopped
    assert signal.getsignal(signal.SIGTERM) == before
