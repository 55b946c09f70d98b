"""Tables and plots of the fidelity study from its per-run records (run_study.py writes them)."""
import math
import textwrap
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

METHOD_ORDER = ("ptq", "lsq", "qvgen_keep_aux", "qvgen", "decay_all")
LABELS = {"ptq": "PTQ only", "lsq": "LSQ QAT + KD (no Phi)", "qvgen_keep_aux": "QVGen, Phi kept",
          "qvgen": "QVGen, rank decay lambda=1/2", "decay_all": "QVGen, decay all (lambda=1)"}
COLOURS = {"ptq": "#888888", "lsq": "#d62728", "qvgen_keep_aux": "#1f77b4", "qvgen": "#2ca02c", "decay_all": "#ff7f0e"}


def _groups(runs):
    groups = defaultdict(list)
    for r in runs:
        groups[(r["bits"], r["method"])].append(r)
    return groups


def final_eval_loss(r):
    if r.get("train") is None:
        return r.get("eval_loss_ptq")
    curve = r["train"]["eval_loss"]
    return curve[-1][1] if curve else None


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return mean(values), (pstdev(values) if len(values) > 1 else 0.0)


def summary_rows(runs):
    rows = []
    for (bits, method), rs in sorted(_groups(runs).items(), key=lambda kv: (kv[0][0], METHOD_ORDER.index(kv[0][1]))):
        rel, rel_sd = mean_std([r["fidelity"]["rel_l2"] for r in rs])
        psnr, psnr_sd = mean_std([r["fidelity"]["psnr_db"] for r in rs])
        ev, ev_sd = mean_std([final_eval_loss(r) for r in rs])
        gn, _ = mean_std([mean([g for g in r["train"]["grad_norm"] if g is not None]) for r in rs if r.get("train")])
        rows.append({"bits": bits, "method": method, "seeds": len(rs), "rel_l2": rel, "rel_l2_std": rel_sd,
                     "psnr_db": psnr, "psnr_db_std": psnr_sd, "eval_loss": ev, "eval_loss_std": ev_sd,
                     "mean_grad_norm": gn})
    return rows


def plus_minus(m, s, digits=4):
    if m is None:
        return "-"
    return f"{m:.{digits}g} ± {s:.2g}"


def summary_markdown(rows):
    lines = ["| bits | method | seeds | sampled rel_l2 vs teacher | PSNR (dB) | final eval loss | mean grad norm |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gn = "-" if r["mean_grad_norm"] is None else f"{r['mean_grad_norm']:.3g}"
        lines.append(f"| {r['bits'].upper()} | {LABELS[r['method']]} | {r['seeds']} "
                     f"| {plus_minus(r['rel_l2'], r['rel_l2_std'])} | {plus_minus(r['psnr_db'], r['psnr_db_std'], 3)} "
                     f"| {plus_minus(r['eval_loss'], r['eval_loss_std'])} | {gn} |")
    return "\n".join(lines)


def _smooth(values, window):
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def mean_curve(curves):
    """Element-wise mean of equally long curves (the shortest length)."""
    n = min(len(c) for c in curves)
    return [mean(c[i] for c in curves) for i in range(n)]


def write_plots(runs, folder: Path):
    """The PNGs of the runs recorded so far (none before the first run ends); returns their paths."""
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    groups = _groups(runs)
    bits_list = sorted({b for b, _ in groups})
    written = []

    # 1. sampled error, mean +- std over seeds
    fig, axes = plt.subplots(1, len(bits_list), figsize=(5.2 * len(bits_list), 3.6), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        methods = [m for m in METHOD_ORDER if (bits, m) in groups]
        vals = [mean_std([r["fidelity"]["rel_l2"] for r in groups[(bits, m)]]) for m in methods]
        ax.bar(range(len(methods)), [v[0] for v in vals], yerr=[v[1] for v in vals], capsize=4,
               color=[COLOURS[m] for m in methods])
        for i, m in enumerate(methods):
            for r in groups[(bits, m)]:
                ax.plot(i, r["fidelity"]["rel_l2"], "k.", ms=4)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([textwrap.fill(LABELS[m], 13) for m in methods], fontsize=7)
        ax.set_ylabel("sampled rel. L2 vs teacher (lower is better)")
        ax.set_title(bits.upper())
    fig.tight_layout()
    written.append(save_png(fig, folder / "rel_l2.png"))

    # 2. eval loss over steps (mean over seeds)
    fig, axes = plt.subplots(1, len(bits_list), figsize=(5.2 * len(bits_list), 3.6), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        for m in METHOD_ORDER:
            if m == "ptq" and groups.get((bits, m)):
                ax.axhline(groups[(bits, m)][0]["eval_loss_ptq"], color=COLOURS[m], ls="--", label=LABELS[m])
            rs = [r for r in groups.get((bits, m), []) if r.get("train")]
            if rs:
                steps = [s for s, _ in rs[0]["train"]["eval_loss"]]
                curve = mean_curve([[v for _, v in r["train"]["eval_loss"]] for r in rs])
                ax.plot(steps[:len(curve)], curve, "-o", ms=2, color=COLOURS[m], label=LABELS[m])
        ax.set_xlabel("training step")
        ax.set_ylabel("loss on the fixed eval set")
        ax.set_yscale("log")
        ax.set_title(bits.upper())
        ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(save_png(fig, folder / "eval_loss.png"))

    # 3. gradient norm over steps (mean over seeds, smoothed), and its ratio to plain LSQ's at the same step
    fig, axes = plt.subplots(2, len(bits_list), figsize=(5.2 * len(bits_list), 6.4), squeeze=False)
    for col, bits in enumerate(bits_list):
        curves = {}
        for m in METHOD_ORDER:
            rs = [r for r in groups.get((bits, m), []) if r.get("train")]
            if rs:
                curves[m] = _smooth(mean_curve([[g if g is not None else float("nan") for g in r["train"]["grad_norm"]]
                                                 for r in rs]), 10)
                axes[0][col].plot(range(1, len(curves[m]) + 1), curves[m], color=COLOURS[m], label=LABELS[m])
        for m, curve in curves.items():
            if m != "lsq" and "lsq" in curves:
                ratio = [a / b for a, b in zip(curve, curves["lsq"])]
                axes[1][col].plot(range(1, len(ratio) + 1), ratio, color=COLOURS[m], label=LABELS[m])
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("gradient norm (smoothed)")
        axes[0][col].set_title(bits.upper())
        axes[0][col].legend(fontsize=6)
        axes[1][col].axhline(1.0, color=COLOURS["lsq"], ls="--", lw=1)
        axes[1][col].set_ylabel("gradient norm / LSQ's")
        axes[1][col].set_xlabel("training step")
        axes[1][col].legend(fontsize=6)
    fig.tight_layout()
    written.append(save_png(fig, folder / "grad_norm.png"))

    # 4. share of small singular values of Phi over training
    fig, axes = plt.subplots(1, len(bits_list), figsize=(5.2 * len(bits_list), 3.6), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        for m in ("qvgen_keep_aux", "qvgen", "decay_all"):
            rs = [r for r in groups.get((bits, m), []) if r.get("train") and r["train"].get("spectrum")]
            if not rs:
                continue
            steps = rs[0]["train"]["spectrum"]["steps"]
            curve = mean_curve([r["train"]["spectrum"]["share_small"] for r in rs])
            ax.plot(steps[:len(curve)], curve, "-o", ms=2, color=COLOURS[m], label=LABELS[m])
        ax.set_xlabel("training step")
        ax.set_ylabel("share of Phi's SVs < 0.1 x step-0 max")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(bits.upper())
        ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(save_png(fig, folder / "aux_spectrum.png"))

    # 5. per-step trajectory error of the sampled evaluation (mean over seeds)
    fig, axes = plt.subplots(1, len(bits_list), figsize=(5.2 * len(bits_list), 3.6), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        for m in METHOD_ORDER:
            rs = groups.get((bits, m), [])
            if rs:
                curve = mean_curve([r["fidelity"]["trajectory_rel_l2"] for r in rs])
                ax.plot(range(1, len(curve) + 1), curve, color=COLOURS[m], label=LABELS[m])
        ax.set_xlabel("sampler step")
        ax.set_ylabel("trajectory rel. L2 vs teacher")
        ax.set_title(bits.upper())
        ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(save_png(fig, folder / "trajectory.png"))
    return written


def save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
