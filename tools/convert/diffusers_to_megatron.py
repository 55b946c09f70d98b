"""Convert a diffusers transformer folder into a megatron dist checkpoint (torch_dist), streaming.

    python tools/convert/diffusers_to_megatron.py --model wan --src Wan2.1-T2V-14B-Diffusers \
        --dst checkpoints/wan14b_megatron --tp 8 --pp 1
    python tools/convert/diffusers_to_megatron.py --model cogvideox --src CogVideoX-2b \
        --dst checkpoints/cogvideox2b_megatron --tp 2 --pp 2

The checkpoint loads at any TP/PP (megatron reshards at load time); --tp/--pp check that the model
splits that way before anything is written.
"""
import argparse
import sys

from megatron_qvgen import cli


def _main(argv) -> int:
    from megatron_qvgen.convert.diffusers_io import CLASS_NAMES
    from megatron_qvgen.convert.to_megatron import diffusers_to_megatron

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CLASS_NAMES), default="wan")
    parser.add_argument("--src", required=True, help="diffusers transformer folder (or its pipeline folder)")
    parser.add_argument("--dst", required=True, help="new checkpoint folder (must not exist)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = diffusers_to_megatron(args.src, args.dst, arch=args.model, tensor_parallel=args.tp,
                                    pipeline_parallel=args.pp, progress=not args.no_progress)
    print(f"wrote {summary.destination}: {summary.tensors} tensors, {summary.parameters:,} parameters")
    return 0


def main(argv=None) -> int:
    cli.quiet_console()
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
