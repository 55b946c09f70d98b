"""What the evaluation leaves behind: a console table, the JSON record and a PNG grid beside it.

``python -m megatron_qvgen.fidelity.report A.json B.json ...`` prints several evaluations of one teacher as
one verdict table (the demo's last word: teacher vs PTQ vs trained student).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

DIFF_GAIN = 4.0   # |teacher - student| is drawn this many times brighter


def write_json(path: str, record: Dict) -> None:
    """Atomically (temporary name, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eval-", suffix=".json.tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def summary_table(record: Dict) -> str:
    """One evaluation: headline figures, then the error along the sampler's steps."""
    head = table([[record["student"], str(record["samples"]), str(record["sampling_steps"]),
                   _fmt(record["rel_l2"]), _fmt(record["psnr_db"], 3)]],
                 ["student", "samples", "steps", "rel_l2", "psnr_db"])
    steps = len(record["timesteps"])
    shown = sorted({0, steps // 4, steps // 2, (3 * steps) // 4, steps - 1})
    per_step = table([[str(k), _fmt(float(record["timesteps"][k]), 5), _fmt(record["trajectory_rel_l2"][k]),
                       _fmt(record["one_step_rel_l2"][k])] for k in shown],
                     ["step", "timestep", "trajectory rel_l2", "one-step rel_l2"])
    return head + "\n\n" + per_step


def verdict_table(records: Sequence[Dict]) -> str:
    """Several students of one teacher: the teacher itself as the first row (error 0 by definition)."""
    rows = [["teacher", "-", "0", "inf"]]
    for r in records:
        rows.append([r.get("label") or r["student"], r.get("student_kind", "-"), _fmt(r["rel_l2"]),
                     _fmt(r["psnr_db"], 3)])
    first = records[0]
    note = f"{first['samples']} samples, {first['sampling_steps']} sampler steps, same noise and text for all"
    return table(rows, ["model", "kind", "rel_l2 vs teacher", "psnr_db vs teacher"]) + "\n" + note


# ---------------------------------------------------------------------------------------- pictures
def latent_rgb(latent: torch.Tensor, latent_source: Dict, reference: torch.Tensor) -> np.ndarray:
    """A stored-layout latent (C, F, H, W) -> [F, H, W, 3] in [0, 1]: through the synthetic projection when the
    data came from it, else channels 0-2 on the colour scale of ``reference`` (the teacher's sample)."""
    from megatron_qvgen.data.synthetic_shards import PROJECTION_NAME, latent_to_rgb

    if latent_source.get("name") == PROJECTION_NAME:
        return latent_to_rgb(latent.float().numpy())
    lat, ref = latent[:3].float(), reference[:3].float()
    if lat.shape[0] < 3:
        lat, ref = lat[:1].expand(3, *lat.shape[1:]), ref[:1].expand(3, *ref.shape[1:])
    lo = ref.amin(dim=(1, 2, 3), keepdim=True)
    hi = ref.amax(dim=(1, 2, 3), keepdim=True)
    return ((lat - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).permute(1, 2, 3, 0).numpy()


def can_draw() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def save_grid(path: str, columns: Sequence[Tuple[str, List[torch.Tensor]]], captions: List[str],
              latent_source: Dict, title: str, diff: bool = True, frames: int = 3) -> str:
    """Per sample (rows), for a few frames: each named column's latent (stored layout), and with ``diff`` the
    |difference| of the first two columns x DIFF_GAIN. Colours on the first column's scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(columns[0][1])
    total = columns[0][1][0].shape[1]
    picks = sorted({0, total // 2, total - 1})[:frames]
    per_frame = len(columns) + int(diff)
    fig, axes = plt.subplots(n, per_frame * len(picks), figsize=(1.6 * per_frame * len(picks), 1.8 * n + 0.6),
                             squeeze=False)
    for row in range(n):
        reference = columns[0][1][row]
        rgbs = [latent_rgb(latents[row], latent_source, reference) for _, latents in columns]
        for j, f in enumerate(picks):
            images = [rgb[f] for rgb in rgbs]
            names = [name for name, _ in columns]
            if diff:
                images.append(np.clip(np.abs(rgbs[0][f] - rgbs[1][f]) * DIFF_GAIN, 0, 1))
                names.append(f"|diff| x{DIFF_GAIN:g}")
            for c, (image, name) in enumerate(zip(images, names)):
                ax = axes[row][per_frame * j + c]
                ax.imshow(image, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{name}\nframe {f}", fontsize=7)
        caption = captions[row] if row < len(captions) else ""
        axes[row][0].set_ylabel("\n".join(_wrap(caption, 28)[:3]), fontsize=5, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".grid-", suffix=".png", dir=folder)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _wrap(text: str, width: int) -> List[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def grid_path(json_path: str) -> str:
    root, _ = os.path.splitext(json_path)
    return root + ".png"


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="one verdict table from several evaluate JSON records")
    parser.add_argument("records", nargs="+", help="JSON files written by python -m megatron_qvgen.evaluate")
    parser.add_argument("--labels", nargs="*", default=None, help="a name per record (default: the student)")
    args = parser.parse_args(argv)
    records = []
    for i, path in enumerate(args.records):
        try:
            with open(path) as f:
                record = json.load(f)
            record["rel_l2"], record["psnr_db"]  # noqa: B018 - a record must have both
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {path}: not an evaluation record ({exc})", file=sys.stderr)
            return 2
        if args.labels and i < len(args.labels):
            record["label"] = args.labels[i]
        records.append(record)
    print(verdict_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
