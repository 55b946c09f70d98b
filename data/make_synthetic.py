#!/usr/bin/env python
"""Write the synthetic moving-shapes dataset as latent shards (see megatron_qvgen.data.synthetic_shards).

    python data/make_synthetic.py --out outputs/synthetic/tiny_wan --channels 16 --frames 3 --height 16 --width 16 \
        --text-len 16 --text-dim 32 --samples 256 --samples-per-shard 32
    # through a real VAE / text encoder instead of the built-in projection / hash embedding:
    python data/make_synthetic.py --out ... --vae Wan2.1/vae --text-encoder Wan2.1/text_encoder --tokenizer Wan2.1/tokenizer
"""
import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--channels", type=int, default=16, help="latent channels (taken from --vae when given)")
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--height", type=int, default=16, help="latent height")
    p.add_argument("--width", type=int, default=16, help="latent width")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--text-dim", type=int, default=32, help="(taken from --text-encoder when given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--max-objects", type=int, default=2)
    p.add_argument("--shard-prefix", default="synthetic")
    p.add_argument("--vae", help="diffusers VAE folder: encode rendered frames instead of projecting them")
    p.add_argument("--text-encoder", help="UMT5EncoderModel / T5EncoderModel folder (needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer folder")
    p.add_argument("--text-padding", choices=("zeros", "encoder"), default="zeros",
                   help="zeros after the prompt (Wan) or the whole encoder output (CogVideoX)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--workers", type=int, default=1,
                   help="processes writing shards at once (projection and hash text encoder only)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_qvgen.data.synthetic_shards import SyntheticSpec, make_synthetic_shards

    if bool(args.text_encoder) != bool(args.tokenizer):
        sys.exit("error: --text-encoder and --tokenizer go together")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = encoder = None
    channels, text_dim = args.channels, args.text_dim
    if args.vae:
        from megatron_qvgen.data.video_vae import VideoVAE

        vae = VideoVAE(args.vae, device=device)
        channels = vae.latent_channels
    if args.text_encoder:
        from megatron_qvgen.data.text_encoders import PretrainedTextEncoder

        encoder = PretrainedTextEncoder(args.text_encoder, args.tokenizer, args.text_len, args.text_padding,
                                        device=device)
        text_dim = encoder.text_dim
    spec = SyntheticSpec(num_samples=args.samples, samples_per_shard=args.samples_per_shard, latent_channels=channels,
                         frames=args.frames, height=args.height, width=args.width, text_len=args.text_len,
                         text_dim=text_dim, seed=args.seed, fps=args.fps, max_objects=args.max_objects,
                         shard_prefix=args.shard_prefix)
    make_synthetic_shards(args.out, spec, vae=vae, text_encoder=encoder, progress=not args.no_progress,
                          workers=args.workers)
    print(f"wrote {spec.num_samples} samples in {spec.num_shards} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
