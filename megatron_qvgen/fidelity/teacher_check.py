"""Does a teacher follow its captions? Sample it on the dataset's prompts and read the clips back.

    python -m megatron_qvgen.fidelity.teacher_check --teacher CKPT --recipe NAME --json OUT.json
        [--samples 32] [--sampling-steps 30] [--seed 0] [--section.field value ...]

For the synthetic one-object set (benchmarks/fidelity/fit_teacher.sh) each sample is decoded to colours and read
(background, object colour, size, direction: ``synthetic_scenes.read_clip``) and compared with what its caption
says; the same reading of the dataset's own clips is the ceiling, and the teacher's samples scored against
ANOTHER prompt's caption is the floor a model ignoring its text would reach. Writes OUT.json and OUT.png
(data | teacher, a few frames per prompt) and prints a table.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from megatron_qvgen.fidelity.errors import EvaluationError


def score(reads: List[Dict], captions: List[Optional[Dict]]) -> Dict[str, float]:
    """Share of clips whose read attribute equals the caption's, per attribute (one-object captions only)."""
    from megatron_qvgen.data.synthetic_scenes import READ_ATTRIBUTES

    pairs = [(r, c) for r, c in zip(reads, captions) if c is not None]
    if not pairs:
        return {}
    return {a: sum(r[a] == c[a] for r, c in pairs) / len(pairs) for a in READ_ATTRIBUTES}


def check_teacher(teacher: str, cfg, json_path: str, samples: int, steps: int, seed: int,
                  batch_size: int = 8) -> Dict:
    from megatron_qvgen.data.synthetic_scenes import caption_attributes, read_clip
    from megatron_qvgen.fidelity import report
    from megatron_qvgen.fidelity.compare import sample
    from megatron_qvgen.fidelity.inputs import load_inputs
    from megatron_qvgen.fidelity.sampler import sampler_for
    from megatron_qvgen.fidelity.session import close_single_process, open_single_process
    from megatron_qvgen.fidelity.students import load_teacher

    info = open_single_process(seed=seed)
    try:
        model = load_teacher(teacher, cfg)
        inputs = load_inputs(cfg, samples, seed)
        sampler = sampler_for(cfg, steps)
        finals = [inputs.stored_layout(x) for x in sample(model, inputs, sampler, batch_size=batch_size,
                                                           device=info.device)]
    finally:
        close_single_process()
    rgb = [report.latent_rgb(x, inputs.latent_source, d) for x, d in zip(finals, inputs.data)]
    data_rgb = [report.latent_rgb(d, inputs.latent_source, d) for d in inputs.data]
    expected = [caption_attributes(c) for c in inputs.captions]
    reads, data_reads = [read_clip(v) for v in rgb], [read_clip(v) for v in data_rgb]
    other = expected[1:] + expected[:1]   # each sample against the next prompt's caption
    record = {
        "teacher": teacher, "samples": samples, "sampling_steps": steps, "sampler": sampler.name, "seed": seed,
        "accuracy": score(reads, expected), "data_accuracy": score(data_reads, expected),
        "other_caption_accuracy": score(reads, other),
        "per_sample": [{"caption": c, "read": r} for c, r in zip(inputs.captions, reads)],
    }
    shown = min(8, samples)
    record["grid_png"] = report.save_grid(
        report.grid_path(json_path), [("data", inputs.data[:shown]), ("teacher", finals[:shown])],
        inputs.captions[:shown], inputs.latent_source,
        f"teacher samples ({steps} {sampler.name} steps) next to a data clip of the same caption", diff=False)
    report.write_json(json_path, record)
    return record


def print_scores(record: Dict) -> None:
    from megatron_qvgen.fidelity.report import table

    rows = [[a, f"{record['accuracy'][a]:.2f}", f"{record['data_accuracy'][a]:.2f}",
             f"{record['other_caption_accuracy'][a]:.2f}"] for a in record["accuracy"]]
    print(table(rows, ["attribute", "teacher samples", "data clips (ceiling)", "vs another caption (floor)"]))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--sampling-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args, rest = parser.parse_known_args(argv)
    from megatron_qvgen import cli

    cli.quiet_console()
    from megatron_qvgen.config import ConfigError, apply_overrides, parse_override_args
    from megatron_qvgen.recipes import get_recipe

    try:
        cfg = apply_overrides(get_recipe(args.recipe), parse_override_args(rest))
        record = check_teacher(args.teacher, cfg, args.json, args.samples, args.sampling_steps, args.seed)
    except (EvaluationError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if record["accuracy"]:
        print_scores(record)
    print(f"wrote {args.json} and {record['grid_png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
