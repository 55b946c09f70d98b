#!/usr/bin/env python
"""Encode a folder of videos + captions into latent webdataset shards (see megatron_qvgen.data.prepare).

    python data/prepare_latents.py --videos clips/ --out shards/wan --pipeline Wan2.1-T2V-1.3B-Diffusers --family wan
    torchrun --nproc-per-node 8 data/prepare_latents.py ...   # one process per GPU, videos split between them

Rerun the same command after a kill or after fixing videos/captions: finished videos are kept, failed ones are
tried again. Exit status: 0 done; 1 some videos failed (0 with --allow-failures); 2 a usage or data error.
"""
import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for the shards, dataset.json and empty_prompt.npy")
    p.add_argument("--captions", help="CSV/TSV/JSONL table (video, caption); default: a .txt beside each video")
    p.add_argument("--pipeline", help="a diffusers pipeline folder with vae/, text_encoder/, tokenizer/")
    p.add_argument("--vae", help="VAE folder (AutoencoderKLWan / AutoencoderKLCogVideoX); overrides --pipeline")
    p.add_argument("--text-encoder", help="UMT5EncoderModel / T5EncoderModel folder; overrides --pipeline")
    p.add_argument("--tokenizer", help="tokenizer folder; overrides --pipeline")
    p.add_argument("--family", choices=("wan", "cogvideox"), default="wan",
                   help="sets the defaults below and the text padding convention")
    p.add_argument("--frames", type=int, help="frames per clip (wan 81, cogvideox 49)")
    p.add_argument("--height", type=int, help="clip height (wan 480, cogvideox 480)")
    p.add_argument("--width", type=int, help="clip width (wan 832, cogvideox 720)")
    p.add_argument("--fps", type=float, help="sampling frame rate (wan 16, cogvideox 8); 0 = consecutive frames")
    p.add_argument("--text-len", type=int, help="text tokens (wan 512, cogvideox 226)")
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--shard-prefix", default="shard")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="default: $RANK")
    p.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="default: $WORLD_SIZE")
    p.add_argument("--device", help="default: cuda:$LOCAL_RANK when a GPU is present, else cpu")
    p.add_argument("--vae-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--text-dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--vae-tiling", action="store_true", help="encode large frames in tiles (less memory)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when some videos could not be encoded (they are listed and skipped)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_qvgen.data.prepare_run import run_preparation

    return run_preparation(lambda: _options(args), args.rank, args.world, args.allow_failures)


def _options(args):
    from megatron_qvgen.config.errors import ConfigError
    from megatron_qvgen.data.prepare import PrepareOptions

    def folder(explicit, sub):
        if explicit:
            return explicit
        if not args.pipeline:
            raise ConfigError(f"give --pipeline or --{sub.replace('_', '-')}")
        return os.path.join(args.pipeline, sub)

    return PrepareOptions(
        videos_dir=args.videos, out_dir=args.out, vae_dir=folder(args.vae, "vae"),
        text_encoder_dir=folder(args.text_encoder, "text_encoder"), tokenizer_dir=folder(args.tokenizer, "tokenizer"),
        family=args.family, captions=args.captions, frames=args.frames, height=args.height, width=args.width,
        fps=args.fps, text_len=args.text_len, samples_per_shard=args.samples_per_shard, rank=args.rank,
        world=args.world, device=args.device, vae_dtype=args.vae_dtype, text_dtype=args.text_dtype,
        vae_tiling=args.vae_tiling, shard_prefix=args.shard_prefix, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
