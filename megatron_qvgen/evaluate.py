"""How close is a quantized student to its teacher? Sample both from the same noise and text and compare.

    python -m megatron_qvgen.evaluate --teacher TEACHER --student STUDENT --json OUT.json [--recipe NAME]
        [--samples N] [--sampling-steps K] [--seed S] [--section.field value ...]

TEACHER: a megatron checkpoint folder of the full-precision model (fit_teacher / diffusers_to_megatron.py).
STUDENT: a training run folder (its latest checkpoint), one iter_* checkpoint, an inference export folder
(run by qvgen_kernels' runtime), or the word ``ptq`` (the teacher quantized by the recipe's initialisation
alone: MSE clip search, no auxiliary module, no training -- the baseline that shows what QAT bought).
The recipe (needed for ptq and exports; a training checkpoint carries its own config) decides the model,
the sampler (Wan: flow-matching Euler; CogVideoX: DDIM v-prediction) and the prompts (the run's shards).
Writes OUT.json (rel_l2, psnr_db, samples, sampling_steps, per-step trajectory and one-step errors, one-step
error per timestep group) and OUT.png (teacher | student | |difference|), and prints a table. Runs in one
process at TP = 1 on the GPU if there is one, else the CPU, whatever TP/PP the checkpoints were saved at.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="megatron checkpoint folder of the full-precision model")
    parser.add_argument("--student", required=True, help="run folder, iter_* checkpoint, export folder, or 'ptq'")
    parser.add_argument("--json", required=True, help="where to write the record (the PNG grid goes beside it)")
    parser.add_argument("--recipe", default=None, help="the run's recipe (needed for ptq and export students)")
    parser.add_argument("--samples", type=int, default=8, help="prompts sampled (default 8)")
    parser.add_argument("--sampling-steps", type=int, default=20, help="sampler steps K (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="initial-noise seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per forward (default 4)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    parser.add_argument("--attention", default=None, help="attention backend of the export runtime, if it offers one")
    args, rest = parser.parse_known_args(argv)
    from megatron_qvgen import cli

    cli.quiet_console()
    from megatron_qvgen.config import ConfigError, parse_override_args
    from megatron_qvgen.fidelity import EvaluationError
    from megatron_qvgen.fidelity.pipeline import EvalOptions, evaluate

    try:
        overrides = parse_override_args(rest)
        options = EvalOptions(samples=args.samples, sampling_steps=args.sampling_steps, seed=args.seed,
                              batch_size=args.batch_size, guidance_scale=args.guidance_scale, attention=args.attention)
        evaluate(args.teacher, args.student, args.json, options, recipe=args.recipe, overrides=overrides)
    except (EvaluationError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
