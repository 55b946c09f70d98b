#!/usr/bin/env python
"""Set runs of several studies side by side (the same teacher, prompts and noise; other settings such as learning
rates): one table, and each method's per-prompt error paired with a baseline's, which separates methods better
than the mean over 16 prompts whose seed-to-seed spread is as large as the differences.

    python benchmarks/fidelity/compare_studies.py \\
        --study "lr 1e-4=benchmarks/fidelity/results/cpu_300steps/results.json" \\
        --study "aux lr 1e-3=benchmarks/fidelity/results/cpu_aux_lr/results.json" \\
        --baseline "lr 1e-4/lsq" --bits w4a4 [--plot docs/fidelity/lr_study.png]

Columns: sampled rel_l2 (final latent after the sampler, all prompts), the one-step error (the student's
prediction at the teacher's latent, mean over sampler steps), the final loss on the fixed evaluation set, and
against the baseline: on how many prompts the method's sampled error (mean over seeds) is lower, and the median
per-prompt ratio.
"""
import argparse
import json
import sys
from pathlib import Path
from statistics import mean, median

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from plots import (COLOURS, LABELS, METHOD_ORDER, final_eval_loss, mean_curve, mean_std, plus_minus,  # noqa: E402
                   save_png)


def load(studies, bits):
    """``{(label, method): [run records]}`` of the trained runs at ``bits`` (PTQ too)."""
    groups = {}
    for label, path in studies:
        with open(path) as f:
            runs = json.load(f)["runs"]
        for r in runs:
            if r["bits"] == bits:
                groups.setdefault((label, r["method"]), []).append(r)
    return groups


def per_prompt(runs):
    """Per-prompt sampled error, mean over seeds."""
    rows = [r["fidelity"]["per_sample_rel_l2"] for r in runs]
    return [mean(col) for col in zip(*rows)]


def table(groups, baseline):
    base = per_prompt(groups[baseline]) if baseline in groups else None
    lines = ["| study | method | seeds | sampled rel_l2 | one-step error | final eval loss | prompts closer than "
             f"{baseline[0]} / {LABELS[baseline[1]]} | median per-prompt ratio |", "|---|---|---|---|---|---|---|---|"]
    for (label, method), runs in groups.items():
        rel = mean_std([r["fidelity"]["rel_l2"] for r in runs])
        one = mean_std([mean(r["fidelity"]["one_step_rel_l2"]) for r in runs])
        ev = mean_std([final_eval_loss(r) for r in runs])
        closer = ratio = "-"
        if base is not None and (label, method) != baseline:
            mine = per_prompt(runs)
            closer = f"{sum(m < b for m, b in zip(mine, base))} of {len(base)}"
            ratio = f"{median(m / b for m, b in zip(mine, base)):.3f}"
        lines.append(f"| {label} | {LABELS[method]} | {len(runs)} | {plus_minus(*rel)} | {plus_minus(*one)} | "
                     f"{plus_minus(*ev)} | {closer} | {ratio} |")
    return "\n".join(lines)


def plot(groups, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    labels = list(dict.fromkeys(label for label, _ in groups))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (label, method), runs in groups.items():
        runs = [r for r in runs if r.get("train")]
        if not runs:
            continue
        steps = [s for s, _ in runs[0]["train"]["eval_loss"]]
        curve = mean_curve([[v for _, v in r["train"]["eval_loss"]] for r in runs])
        ax.plot(steps[:len(curve)], curve, styles[labels.index(label) % len(styles)], color=COLOURS[method],
                label=f"{label}: {LABELS[method]}")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss on the fixed eval set (mean over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", action="append", required=True, help="LABEL=path/to/results.json (repeat)")
    p.add_argument("--baseline", required=True, help="LABEL/METHOD the per-prompt comparison is against")
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--plot", default=None, help="PNG of the eval-loss curves")
    args = p.parse_args(argv)
    studies = [tuple(s.split("=", 1)) for s in args.study]
    if any(len(s) != 2 for s in studies):
        p.error("--study takes LABEL=path/to/results.json")
    baseline = tuple(args.baseline.rsplit("/", 1))
    groups = load(studies, args.bits)
    if baseline not in groups:
        p.error(f"--baseline {args.baseline}: no {args.bits} runs of that label and method")
    order = {label: i for i, (label, _) in enumerate(studies)}
    groups = dict(sorted(groups.items(), key=lambda kv: (order[kv[0][0]], METHOD_ORDER.index(kv[0][1]))))
    print(table(groups, baseline))
    if args.plot:
        print("wrote", plot(groups, Path(args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
