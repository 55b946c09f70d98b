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

A run whose JSON is already there is not repeated (an interrupted study resumes).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
METHODS = ("ptq", "lsq", "qvgen_keep_aux", "qvgen", "decay_all")


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
    args, rest = p.parse_known_args(argv)
    return args, rest


def run_all(args, rest):
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    queue = []
    for bits in args.bits:
        for method in args.methods:
            for seed in (args.seeds[:1] if method == "ptq" else args.seeds):  # PTQ has no randomness
                path = out / "runs" / f"{bits}_{method}_s{seed}.json"
                if path.exists():
                    continue
                cmd = [sys.executable, "-m", "megatron_qvgen.fidelity.study", "--teacher", args.teacher,
                       "--recipe", args.recipe, "--method", method, "--bits", bits, "--seed", str(seed),
                       "--json", str(path), "--samples", str(args.samples), "--sampling-steps",
                       str(args.sampling_steps), "--data.shards", args.data, *rest]
                if args.steps:
                    cmd += ["--train.steps", str(args.steps)]
                queue.append((path, cmd))
    running = []
    failed = []
    start = time.perf_counter()
    while queue or running:
        while queue and len(running) < args.jobs:
            path, cmd = queue.pop(0)
            log = open(path.with_suffix(".log"), "w")
            running.append((path, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        time.sleep(1.0)
        for item in list(running):
            path, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}, see {path.with_suffix('.log')})"
            if proc.returncode:
                failed.append(path.name)
            print(f"[{time.perf_counter() - start:7.0f} s] {path.stem}: {status}", flush=True)
    return failed


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
    failed = run_all(args, rest)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
