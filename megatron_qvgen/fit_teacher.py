"""Fit a small full-precision teacher from scratch (for the tiny recipes and the CPU demo).

    torchrun --nproc-per-node N -m megatron_qvgen.fit_teacher --recipe tiny_wan --out outputs/tiny_wan/teacher \\
        [--steps 300] [--lr 1e-3] [--section.field value ...]
"""
from __future__ import annotations

import sys
from typing import List, Optional

from megatron_qvgen import cli
from megatron_qvgen.config import apply_overrides, parse_override_args


def _main(argv: Optional[List[str]]) -> int:
    parser = cli.recipe_parser(__doc__)
    parser.add_argument("--out", required=True, help="where to write the megatron checkpoint")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    args, rest = parser.parse_known_args(argv)
    from megatron_qvgen.recipes import get_recipe

    cfg = apply_overrides(get_recipe(args.recipe), parse_override_args(rest))
    from megatron_qvgen.parallel import destroy_parallel, init_distributed
    from megatron_qvgen.training.teacher_fit import fit_teacher

    init_distributed(None if cfg.parallel.backend == "auto" else cfg.parallel.backend)
    try:
        loss = fit_teacher(cfg, args.out, args.steps, args.lr)
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
