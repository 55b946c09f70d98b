"""QAT distillation entry point.

    torchrun --nproc-per-node N -m megatron_qvgen.train --recipe tiny_wan [--init-from CKPT] \\
        [--train.steps 200 --parallel.tensor_parallel 2 ...]

``--init-from`` is a megatron checkpoint of the full-precision model (tools/convert/diffusers_to_megatron.py);
without it the teacher (and so the student) start from the recipe's seeded random initialisation.
A run continues from its own newest checkpoint in ``train.save_dir``; ``train.load_dir`` only starts a run.
Any config field is overridden with ``--section.field value``; ``--print-config`` shows them all.
Exit status: 0 finished, 75 stopped with a checkpoint to be requeued (training/run_control.py), 1/2 an error.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from megatron_qvgen import cli
from megatron_qvgen.config import apply_overrides, parse_override_args


def parse_args(argv: Optional[List[str]] = None):
    parser = cli.recipe_parser(__doc__)
    parser.add_argument("--init-from", default=None, help="megatron checkpoint of the full-precision model")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    return args, parse_override_args(rest)


def _main(argv: Optional[List[str]]) -> int:
    args, overrides = parse_args(argv)
    from megatron_qvgen.recipes import get_recipe

    cfg = apply_overrides(get_recipe(args.recipe), overrides)
    if args.print_config:
        print(cfg.to_json())
        return 0
    from megatron_qvgen.parallel import destroy_parallel, init_distributed
    from megatron_qvgen.training.loop import Trainer

    init_distributed(None if cfg.parallel.backend == "auto" else cfg.parallel.backend)
    try:
        state = Trainer(cfg, init_from=args.init_from).setup().train()
    finally:
        destroy_parallel()
    return state.outcome.exit_code  # 0 finished, 75 stopped to be requeued (training/run_control.py)


def main(argv: Optional[List[str]] = None) -> int:
    cli.quiet_console()
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
