"""Run a diffusers transformer and its megatron checkpoint on the same random input; print the difference.

    python tools/convert/verify.py --diffusers DIR --megatron CKPT_DIR
    torchrun --nproc-per-node 4 tools/convert/verify.py --diffusers DIR --megatron CKPT_DIR --tp 2 --pp 2

The world size must be a multiple of TP x PP.
"""
import argparse
import sys

from megatron_qvgen import cli

DTYPES = ("fp32", "bf16")


def _main(argv) -> int:
    import torch

    from megatron_qvgen.convert.verify import verify_conversion
    from megatron_qvgen.parallel import destroy_parallel, init_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers", required=True, help="diffusers transformer folder")
    parser.add_argument("--megatron", required=True, help="megatron dist checkpoint folder")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latent-frames", type=int, default=2, help="latent frames / temporal patch")
    parser.add_argument("--latent-size", type=int, default=8, help="latent height and width / spatial patch")
    parser.add_argument("--text-len", type=int, default=None,
                        help="text tokens (default: 16 for Wan, max_text_seq_length for CogVideoX)")
    args = parser.parse_args(argv)
    init_distributed()
    try:
        result = verify_conversion(args.diffusers, args.megatron, tensor_parallel=args.tp, pipeline_parallel=args.pp,
                                   sequence_parallel=args.sequence_parallel,
                                   dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
                                   seed=args.seed, latent_frames=args.latent_frames,
                                   latent_height=args.latent_size, latent_width=args.latent_size,
                                   text_len=args.text_len)
    finally:
        destroy_parallel()
    if result is not None:
        print(f"output {result.shape}: max abs diff {result.max_abs:.3e}, max rel diff {result.max_rel:.3e} "
              f"(reference max {result.reference_max:.3e}), tp={args.tp} pp={args.pp} dtype={args.dtype}")
    return 0


def main(argv=None) -> int:
    cli.quiet_console()
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
