"""QAT distillation entry point.

    torchrun --nproc-per-node N -m megatron_qvgen.train --recipe tiny_wan [--init-from CKPT] \\
        [--train.steps 200 --parallel.tensor_parallel 2 ...]

``--init-from`` is a megatron checkpoint of the full-precision model (tools/convert/diffusers_to_megatron.py);
without it the teacher (and so the student) start from the recipe's seeded random initialisation.
A run continues from its own newest checkpoint in ``train.save_dir``; ``train.load_dir`` only starts a run.
Exit status: 0 finished, 75 stopped with a checkpoint to be requeued (training/run_control.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from megatron_qvgen.config import ConfigError, apply_overrides, parse_override_args


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe name (megatron_qvgen.recipes)")
    parser.add_argument("--init-from", default=None, help="megatron checkpoint of the full-precision model")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    return args, parse_override_args(rest)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    from megatron_qvgen.recipes import get_recipe

    try:
        cfg = apply_overrides(get_recipe(args.recipe), overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
