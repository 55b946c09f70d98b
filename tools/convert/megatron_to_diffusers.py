"""Convert a megatron dist checkpoint (torch_dist) into a diffusers transformer folder, streaming.

    python tools/convert/megatron_to_diffusers.py --src checkpoints/wan14b_megatron --dst wan14b_diffusers

The result loads with ``WanTransformer3DModel.from_pretrained(DST)`` (or ``CogVideoXTransformer3DModel``,
as the checkpoint records).
"""
import argparse
import sys

from megatron_qvgen import cli


def _main(argv) -> int:
    from megatron_qvgen.convert.to_diffusers import megatron_to_diffusers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="megatron dist checkpoint folder")
    parser.add_argument("--dst", required=True, help="new diffusers folder (must not exist)")
    parser.add_argument("--key-prefix", default="", help="prefix of the model's keys in the checkpoint")
    parser.add_argument("--max-shard-gib", type=float, default=5.0, help="size of each safetensors shard")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = megatron_to_diffusers(args.src, args.dst, key_prefix=args.key_prefix,
                                    max_shard_bytes=int(args.max_shard_gib * 2**30), progress=not args.no_progress)
    print(f"wrote {summary.destination}: {summary.tensors} tensors"
          + (f" ({len(summary.skipped_keys)} other checkpoint keys left out)" if summary.skipped_keys else ""))
    return 0


def main(argv=None) -> int:
    cli.quiet_console()
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
