#!/usr/bin/env python
"""The fidelity study, one command: PTQ, plain LSQ QAT (no Phi), QVGen with Phi kept, QVGen with rank decay
(lambda = 1/2 to r = 0) and decay of all ranks at once (lambda = 1), at W4A4 and W3A3, several seeds, all with the
same budget (steps, batch, learning rates, data, evaluation prompts and noise). Each run is one process of
``python -m megatron_qvgen.fidelity.study``; ``--jobs`` of them share the machine (one GPU holds several of these
small runs at once). Then the per-run records are gathered into one results JSON, a markdown table (mean +- std
over seeds) and the plots (plots.py).

    python benchmarks/fidelity/run_study.py --teacher outputs/fidelity/small_wan/teacher --recipe small_wan \\
        --data outputs/fidelity/small_wan/data --out benchmarks/fidelity/results/gpu --jobs 8 [--steps 400] \\
        [--seeds 0 1 2] [--section.field value ...]

A run whose JSON is already there is not repeated (an interrupted study resumes). ``--deadline-s S`` fits the
study into time-limited calls (the lent GPU runs a command for at most 10 minutes): a trained run starts while
90 s are left, PTQ only if it would end before S seconds (judged by the runs finished so far); runs still
training at S are stopped after a checkpoint (``<out>/resume/<run>``, with the curves recorded so far) and
continue from it next time; runs being measured finish their record; the results of what is done are written,
and the exit status is 3 while runs remain: the same command again continues. A checkpoint is only written at
such a stop; one left behind is scratch that the next call reads (on a machine that kept it).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
from megatron_qvgen.training.run_control import EXIT_STOPPED, FINISHED_MARKER  # noqa: E402

METHODS = ("ptq", "lsq", "qvgen_keep_aux", "qvgen", "decay_all")
STOP_GRACE_S = 45.0   # for all the runs stopped at the deadline to save; gpu_study.sh keeps 60 s after it
MIN_START_S = 90.0    # a continued run's set-up plus some steps: less than this left, it waits for the next call


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--data", required=True, help="the latent shards the teacher was fitted on")
    p.add_argument("--out", required=True, help="folder for the per-run JSON, results.json and results.md")
    p.add_argument("--plots", default=None, help="folder for the PNG plots (default: --out)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--bits", nargs="+", default=["w4a4", "w3a3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--samples", type=int, default=16, help="sampled prompts per evaluation")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop starting runs that would not end within this many seconds; stop the rest then")
    args, rest = p.parse_known_args(argv)
    return args, rest


def run_all(args, rest):
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    queue = []
    # seed inside bits, method innermost: a study stopped by its deadline has every method at the seeds it reached
    for bits in args.bits:
        for seed in args.seeds:
            for method in args.methods:
                if method == "ptq" and seed != args.seeds[0]:   # PTQ has no randomness: one run
                    continue
                path = out / "runs" / f"{bits}_{method}_s{seed}.json"
                if path.exists():
                    continue
                cmd = [sys.executable, "-m", "megatron_qvgen.fidelity.study", "--teacher", args.teacher,
                       "--recipe", args.recipe, "--method", method, "--bits", bits, "--seed", str(seed),
                       "--json", str(path), "--samples", str(args.samples), "--sampling-steps",
                       str(args.sampling_steps), "--data.shards", args.data, *rest]
                if method != "ptq":   # trains: a stop at the deadline saves it, and the next call continues
                    resume = out / "resume" / path.stem
                    if (resume / FINISHED_MARKER).exists():   # its record was removed: train it again from the start
                        spent = resume.with_name(f"{resume.name}.spent-{time.strftime('%Y%m%d-%H%M%S')}")
                        resume.rename(spent)
                        print(f"{path.stem}: no record, but its checkpoint went on to one: moved to {spent}; "
                              f"the run starts over", flush=True)
                    cmd += ["--resume-dir", str(resume)]
                if args.steps:
                    cmd += ["--train.steps", str(args.steps)]
                queue.append((path, cmd))
    return run_queue(queue, args.jobs, args.deadline_s)


class RunnerStopped(SystemExit):
    """The runner itself got SIGTERM (exit status 143)."""


def run_queue(queue, jobs: int, deadline=None, min_start_s: float = MIN_START_S):
    """Run ``(record path, command)`` pairs, ``jobs`` at once, each logging to its path's .log (appended: a run
    continued from an earlier call keeps that call's log); with a ``deadline`` in seconds see the module docstring.
    A command with ``--resume-dir`` starts while ``min_start_s`` are left (what it trains is kept for the next
    call); any other only if the slowest run so far would end in time.
    Returns (failed run names, run names not done). Whatever ends this call, no run is left running."""
    running = []
    failed = []
    durations = []     # of the runs finished in this call: the estimate of the next one's
    start = time.perf_counter()
    # jobs sharing the CPU each get their share of its cores (oversubscribed OpenMP threads slow every run)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))

    def say(path, what):
        print(f"[{time.perf_counter() - start:7.0f} s] {path.stem}: {what}", flush=True)

    def ended(path, proc, log, stopped=False) -> None:
        log.close()
        if proc.returncode == 0:
            say(path, "ok")
        elif stopped and proc.returncode in (EXIT_STOPPED, -signal.SIGTERM, -signal.SIGKILL):
            queue.insert(0, (path, None))          # continued (or, without a checkpoint, redone) by the next call
            say(path, "stopped at the deadline")
        else:
            failed.append(path.name)
            say(path, f"FAILED (rc {proc.returncode}, see {path.with_suffix('.log')})")

    def fits() -> bool:
        if deadline is None or not queue:
            return True
        resumable = "--resume-dir" in (queue[0][1] or ())
        expected = min_start_s if resumable else (max(durations) if durations else 0.0)
        return time.perf_counter() - start + expected < deadline

    stop = []    # SIGTERM to the runner itself: its runs are stopped as at a deadline, then it exits 143

    def stop_requested(signum, frame):   # only a flag: a run being started is never left out of ``running``
        stop.append(signum)

    previous = (signal.signal(signal.SIGTERM, stop_requested)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        while (queue and fits() and not stop) or running:
            while queue and len(running) < jobs and fits() and not stop:
                path, cmd = queue.pop(0)
                log = open(path.with_suffix(".log"), "a")
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(map(str, cmd))}\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
                running.append((path, proc, log, time.perf_counter()))
            time.sleep(1.0)
            for item in list(running):
                path, proc, log, began = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                durations.append(time.perf_counter() - began)
                ended(path, proc, log)
            if stop or (deadline is not None and time.perf_counter() - start >= deadline):
                for _, proc, _, _ in running:
                    proc.terminate()   # the trainer's SIGTERM handling saves at the end of its step, then stops
                stop_by = time.perf_counter() + STOP_GRACE_S
                for path, proc, log, _ in reversed(running):   # reversed: queue.insert(0) keeps their order
                    try:
                        proc.wait(timeout=max(stop_by - time.perf_counter(), 0.1))
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    ended(path, proc, log, stopped=True)
                running = []
                break
    finally:
        for _, proc, log, _ in running:   # whatever ends the runner, no run goes on without it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if stop:
        raise RunnerStopped(128 + stop[0])
    return failed, [path.stem for path, _ in queue]


def gather(out: Path):
    runs = []
    for path in sorted((out / "runs").glob("*.json")):
        with open(path) as f:
            record = json.load(f)
        record.pop("config", None)
        runs.append(record)
    return runs


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    failed, left = run_all(args, rest)
    out = Path(args.out)
    runs = gather(out)
    sys.path.insert(0, str(HERE))
    from plots import summary_rows, summary_markdown, write_plots

    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "summary": summary_rows(runs), "runs": runs}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(summary_markdown(results["summary"]) + "\n")
    print(summary_markdown(results["summary"]))
    for png in write_plots(runs, Path(args.plots or out)):
        print("wrote", png)
    if failed:
        print(f"{len(failed)} runs failed: {failed}", file=sys.stderr)
        return 1
    if left:
        print(f"{len(left)} runs not done by the deadline ({', '.join(left)}): the same command again continues",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
