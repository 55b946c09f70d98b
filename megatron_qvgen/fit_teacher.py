"""Fit a small full-precision teacher from scratch (for the tiny recipes and the CPU demo).

    torchrun --nproc-per-node N -m megatron_qvgen.fit_teacher --recipe tiny_wan --out outputs/tiny_wan/teacher \\
        [--steps 300] [--lr 1e-3] [--checkpoint-every 500] [--section.field value ...]

With ``--checkpoint-every N`` a full training checkpoint is kept in ``--checkpoint-dir`` (default OUT.fit, the
newest only) and the same command started again continues from it, to the same teacher.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from megatron_qvgen import cli
from megatron_qvgen.config import ConfigError, apply_overrides, parse_override_args


def _main(argv: Optional[List[str]]) -> int:
    parser = cli.recipe_parser(__doc__)
    parser.add_argument("--out", required=True, help="where to write the megatron checkpoint")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="steps between resumable checkpoints (0: none; a stopped fit starts over)")
    parser.add_argument("--checkpoint-dir", default=None, help="where they go (default: OUT.fit)")
    args, rest = parser.parse_known_args(argv)
    from megatron_qvgen.recipes import get_recipe

    cfg = apply_overrides(get_recipe(args.recipe), parse_override_args(rest))
    if args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    checkpoint_dir = (args.checkpoint_dir or args.out.rstrip("/") + ".fit") if args.checkpoint_every else None
    from megatron_qvgen.parallel import destroy_parallel, init_distributed
    from megatron_qvgen.training.teacher_fit import fit_teacher

    init_distributed(None if cfg.parallel.backend == "auto" else cfg.parallel.backend)
    try:
        loss = fit_teacher(cfg, args.out, args.steps, args.lr, checkpoint_dir, args.checkpoint_every)
        if cli.global_rank() == cli.world_size() - 1:   # a rank of the last pipeline stage holds the loss
            print(f"teacher saved to {args.out} (final loss {loss:.4f})")
    finally:
        destroy_parallel()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    cli.quiet_console()
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
