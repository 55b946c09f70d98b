"""Export a QAT training checkpoint (auxiliary module decayed to rank 0) as a standalone inference folder.

    python tools/convert/export_inference.py --src runs/wan14b/checkpoints --dst exports/wan14b_w4a4

The folder (packed integer weight codes, scales, zero points, activation clip factors per timestep group,
the rest in bf16, config.json, quantization_config.json) loads with
``qvgen_kernels.runtime.load_transformer(DST, device)`` (Wan or CogVideoX, from config.json), which needs
neither megatron nor this training code. ``--src`` is a run's checkpoint directory (its latest checkpoint) or one ``iter_*`` folder.
"""
import argparse
import sys

from megatron_qvgen import cli


def _main(argv) -> int:
    from megatron_qvgen.convert.to_inference import export_inference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="training checkpoint (run directory or iter_* folder)")
    parser.add_argument("--dst", required=True, help="export folder")
    parser.add_argument("--keep-aux", action="store_true",
                        help="export live auxiliary factors (rank > 0) as a bf16 low-rank side branch")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export in --dst (other files there are left alone)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    s = export_inference(args.src, args.dst, keep_aux=args.keep_aux, overwrite=args.overwrite,
                         progress=not args.no_progress)
    print(f"wrote {s.destination}: {s.quantized} quantized linears, {s.plain} other tensors (step {s.step}"
          + (f", auxiliary rank {s.aux_rank} kept as a side branch" if s.aux_rank else "") + ")")
    return 0


def main(argv=None) -> int:
    cli.quiet_console()
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
