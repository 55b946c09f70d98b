#!/usr/bin/env python
"""Study runs recorded by more than one call: one study out of them, and what the repeats say about noise.

A GPU study made in several calls can record the same run twice (same method, bits, seed, config and machine
kind). Training on the GPU is not bit-reproducible (PTQ, which trains nothing, repeats exactly), so two trainings
of one seed differ; how much, measured on the repeats, is the smallest difference between methods worth reading.

    python benchmarks/fidelity/repeat_runs.py --runs benchmarks/fidelity/results/gpu/w3a3_call1/runs \\
        benchmarks/fidelity/results/gpu/w3a3_call2/runs --out benchmarks/fidelity/results/gpu/w3a3 \\
        --plots docs/fidelity/gpu_w3a3

Writes to --out: results.json / results.md (run_study.py's format; where a run is in several folders, the first
folder's record, a rule fixed before looking at the numbers) and repeats.md (each repeated run's sampled rel_l2,
PSNR, one-step error and final evaluation loss call by call, their spread, and on how many prompts the first
call's error is below the second's; then every method's trainings pooled, seeds and repeats alike, against
--baseline's: mean, ratio and two-sided permutation p, over all trainings and with labels exchanged only within a
seed); the plots to --plots (default: --out). Records of one run with other settings or measured otherwise are
refused: they are not repeats. A record found again unchanged in a later folder is a copy (a call's archive holds
every record of the study so far) and is left out.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from statistics import mean, stdev

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from plots import LABELS, METHOD_ORDER, final_eval_loss, summary_markdown, summary_rows, write_plots  # noqa: E402

sys.path.insert(0, str(HERE.parent.parent))
from megatron_qvgen.training.run_config_check import flatten_config  # noqa: E402


# where and how a run saves and logs: these may differ between calls of one study
NOT_SETTINGS = {"save_dir", "save_interval", "load_dir", "save_interval_minutes", "exit_after_minutes", "keep_last",
                "break_lock", "fully_parallel_save", "async_save", "log_interval", "tensorboard_dir", "image_interval"}


# config fields added after runs were recorded, with the value that is what those runs did (commit that added it)
ADDED_LATER = {"quant.decay_moments": "reset"}   # 5d4767c: moments were always reset at a boundary before


def _settings(config):
    """The run's config without the fields that say only where and how it saved and logged (flattened)."""
    flat = {k: v for k, v in flatten_config(config or {}).items()
            if not (k.startswith("train.") and k[len("train."):] in NOT_SETTINGS)}
    for key, value in ADDED_LATER.items():
        flat.setdefault(key, value)
    return flat


def _measured_with(record):
    """How a record was measured: a repeat is sampled the same way (prompts, sampler steps, sampler)."""
    f = record["fidelity"]
    return {"fidelity.samples": f.get("samples"), "fidelity.sampling_steps": f.get("sampling_steps"),
            "sampler": record.get("sampler")}


def _same_record(a, b) -> bool:
    """The same record copied into two folders (each call's archive holds every record made so far), not a
    second run: equal in every field, its wall-clock seconds included (which no second run repeats)."""
    skip = {"recorded_in"}
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def load_runs(folders):
    """``{(bits, method, seed): [record per folder that holds it, in folder order]}``; a run recorded twice with
    other settings (learning rate, steps, data, ...) or measured otherwise (prompts, sampler steps) is refused,
    naming the fields; a record's exact copy in a later folder is left out (it repeats nothing)."""
    runs = {}
    for folder in folders:
        paths = sorted(Path(folder).glob("*.json"))
        if not paths:
            raise SystemExit(f"error: {folder} holds no run records (*.json)")
        for path in paths:
            with open(path) as f:
                record = json.load(f)
            settings = {**_settings(record.pop("config", None)), **_measured_with(record)}
            record["recorded_in"] = str(folder)
            key = (record["bits"], record["method"], record["seed"])
            if key in runs:
                first, first_settings = runs[key][0]
                copy_of = next((r for r, _ in runs[key] if _same_record(r, record)), None)
                if copy_of is not None:
                    print(f"{path}: the record of {copy_of['recorded_in']} again (a copy, not a repeat): left out")
                    continue
                differ = sorted(k for k in settings.keys() | first_settings.keys()
                                if settings.get(k) != first_settings.get(k))
                if differ:
                    raise SystemExit(f"error: {path} is not a repeat of the run in {first['recorded_in']}: "
                                     f"they differ in {', '.join(differ)}")
            runs.setdefault(key, []).append((record, settings))
    return {key: [record for record, _ in entries] for key, entries in runs.items()}


def _metrics(r):
    f = r["fidelity"]
    return {"rel_l2": f["rel_l2"], "psnr_db": f["psnr_db"], "one_step": mean(f["one_step_rel_l2"]),
            "eval_loss": final_eval_loss(r)}


def repeats_markdown(runs) -> str:
    lines = ["| bits | method | seed | sampled rel_l2 (calls) | spread | PSNR dB (calls) | one-step error (calls) | "
             "final eval loss (calls) | spread | prompts lower in call 1 than call 2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    spreads = []
    key = lambda k: (k[0], METHOD_ORDER.index(k[1]), k[2])  # noqa: E731
    for (bits, method, seed) in sorted(runs, key=key):
        records = runs[(bits, method, seed)]
        if len(records) < 2:
            continue
        m = [_metrics(r) for r in records]
        first, other = records[0]["fidelity"]["per_sample_rel_l2"], records[1]["fidelity"]["per_sample_rel_l2"]
        rel = [x["rel_l2"] for x in m]
        ev = [x["eval_loss"] for x in m]
        ev_spread = (max(ev) - min(ev)) / min(ev) if None not in ev and min(ev) else None
        if records[0].get("train") is not None:
            spreads.append(max(rel) - min(rel))
        join = lambda name, fmt: " / ".join(format(x[name], fmt) for x in m)  # noqa: E731
        lines.append(f"| {bits.upper()} | {LABELS[method]} | {seed} | {join('rel_l2', '.4f')} | "
                     f"{max(rel) - min(rel):.4f} | {join('psnr_db', '.2f')} | {join('one_step', '.4f')} | "
                     f"{' / '.join('-' if e is None else format(e, '.5f') for e in ev)} | "
                     f"{'-' if ev_spread is None else format(ev_spread, '.1%')} | "
                     f"{sum(a < b for a, b in zip(first, other))} of {len(first)} |")
    if spreads:
        lines.append(f"\nTrained runs repeated: {len(spreads)}; spread (largest - smallest) of the sampled rel_l2: "
                     f"mean {mean(spreads):.4f}, largest {max(spreads):.4f}.")
    return "\n".join(lines)


def permutation_p(a, b, limit: int = 20000) -> float:
    """Two-sided p of the difference of means of ``a`` and ``b`` under exchange of their values: exact over every
    split up to ``limit`` splits, else over ``limit`` seeded random ones (the observed split counted once)."""
    return within_seed_permutation_p([(a, b)], limit)


def within_seed_permutation_p(pairs, limit: int = 20000) -> float:
    """Two-sided p of the difference of the means of all a and all b, with labels exchanged only among the values
    of one seed (``pairs``: one ``(values of a, values of b)`` per seed; repeats of one seed are not independent of
    each other). Exact up to ``limit`` splits, else ``limit`` seeded random ones (the observed split counted once,
    so p is never 0)."""
    import itertools
    import math
    import random

    a_all = [x for a, _ in pairs for x in a]
    b_all = [x for _, b in pairs for x in b]
    observed = abs(mean(a_all) - mean(b_all))
    total, n_a, n_b = sum(a_all) + sum(b_all), len(a_all), len(b_all)
    per_seed = [(list(a) + list(b), len(a)) for a, b in pairs]

    def extreme(a_sum):
        return abs(a_sum / n_a - (total - a_sum) / n_b) >= observed - 1e-12

    if math.prod(math.comb(len(v), k) for v, k in per_seed) <= limit:
        choices = [[sum(v[i] for i in idx) for idx in itertools.combinations(range(len(v)), k)] for v, k in per_seed]
        sums = [sum(c) for c in itertools.product(*choices)]
        return sum(map(extreme, sums)) / len(sums)
    rng = random.Random(0)
    hits = sum(extreme(sum(sum(rng.sample(v, k)) for v, k in per_seed)) for _ in range(limit))
    return (1 + hits) / (limit + 1)


def pooled_markdown(runs, baseline: str) -> str:
    """Every training of a method pooled (seeds and their repeats alike), against the baseline method's: the
    question the repeats leave, whether a gap between methods exceeds what training twice moves."""
    trained, by_seed = {}, {}
    for (bits, method, seed), records in runs.items():
        if records[0].get("train") is not None:
            values = [r["fidelity"]["rel_l2"] for r in records]
            trained.setdefault((bits, method), []).extend(values)
            by_seed.setdefault((bits, method), {})[seed] = values
    lines = [f"| bits | method | trainings | sampled rel_l2, mean +- std | ratio to {LABELS[baseline]} | "
             "two-sided permutation p | p, labels exchanged within a seed |", "|---|---|---|---|---|---|---|"]
    for (bits, method) in sorted(trained, key=lambda k: (k[0], METHOD_ORDER.index(k[1]))):
        values, base = trained[(bits, method)], trained.get((bits, baseline))
        spread = f"{mean(values):.4f} +- {stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"
        if method == baseline or not base:
            lines.append(f"| {bits.upper()} | {LABELS[method]} | {len(values)} | {spread} | - | - | - |")
            continue
        mine, theirs = by_seed[(bits, method)], by_seed[(bits, baseline)]
        within = (within_seed_permutation_p([(mine[seed], theirs[seed]) for seed in sorted(mine)])
                  if mine.keys() == theirs.keys() else None)   # needs both methods at the same seeds
        lines.append(f"| {bits.upper()} | {LABELS[method]} | {len(values)} | {spread} | "
                     f"{mean(values) / mean(base):.3f} | {permutation_p(values, base):.3f} | "
                     f"{'-' if within is None else format(within, '.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="runs folders, in priority order")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", nargs="+", default=None, help="only these bit widths (default: all)")
    p.add_argument("--plots", default=None, help="folder for the PNG plots (default: --out)")
    p.add_argument("--baseline", default="lsq", help="the method every other's pooled trainings are set against")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    if args.bits:
        runs = {k: v for k, v in runs.items() if k[0] in args.bits}
    chosen = [records[0] for records in runs.values()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["repeat_runs.py", *(argv if argv is not None else sys.argv[1:])]),
               "summary": summary_rows(chosen), "runs": chosen}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(summary_markdown(results["summary"]) + "\n")
    repeats = repeats_markdown(runs) + "\n\n" + pooled_markdown(runs, args.baseline)
    (out / "repeats.md").write_text(repeats + "\n")
    print(summary_markdown(results["summary"]), "\n", repeats, sep="\n")
    for png in write_plots(chosen, Path(args.plots or out)):
        print("wrote", png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
