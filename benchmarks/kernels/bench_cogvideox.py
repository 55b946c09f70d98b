"""CogVideoX runtime benchmark: the CogVideoX-2B (and optionally 5B) real-config forward, W4A4 vs bf16.

Both sides are ``CogVideoXRuntimeTransformer`` (the bf16 side has plain ``nn.Linear``: diffusers' math, checked
bit-identical to diffusers on CPU in tests/test_runtime_cogvideox.py), bf16 attention through
``F.scaled_dot_product_attention``, random weights (random codes and scales on the quantized side). 49 frames at
480 x 720 through the CogVideoX VAE: 13 x 60 x 90 latents, 13 x 30 x 45 = 17550 video + 226 text = 17776 tokens.
A CUDA-time breakdown by kernel family (bench_wan.breakdown) of each run says what limits it.

    python benchmarks/kernels/bench_cogvideox.py --out DIR [--models 2b,5b] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench_wan import DEVICE, compare_forward
from qvgen_kernels.cogvideox_model import CogVideoXRuntimeTransformer

COGVIDEOX = {
    "2b": dict(num_attention_heads=30, attention_head_dim=64, num_layers=30),
    "5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, use_rotary_positional_embeddings=True),
}
LATENT = (13, 16, 60, 90)      # (F, C, H, W)
TEXT_TOKENS, TEXT_DIM = 226, 4096
TINY = dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, time_embed_dim=16, text_embed_dim=32,
            in_channels=4, out_channels=4, sample_height=8, sample_width=8, max_text_seq_length=8)


@torch.no_grad()
def bench_forward(name: str, cfg: dict, out: dict):
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    latents = torch.randn(1, *LATENT, device=DEVICE, generator=gen).to(torch.bfloat16)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, device=DEVICE, generator=gen).to(torch.bfloat16)
    t = torch.tensor([937], device=DEVICE)
    out[f"cogvideox{name}_forward"] = compare_forward(CogVideoXRuntimeTransformer, cfg,
                                                      lambda m: m(latents, text, t, return_dict=False)[0],
                                                      latents.shape)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="2b", help="comma-separated: 2b, 5b")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run)")
    args = p.parse_args()
    global LATENT, TEXT_TOKENS, TEXT_DIM
    if args.tiny:
        for cfg in COGVIDEOX.values():
            cfg.update(TINY)
        LATENT, TEXT_TOKENS, TEXT_DIM = (2, 4, 8, 8), 8, 32
    tokens = LATENT[0] * (LATENT[2] // 2) * (LATENT[3] // 2) + TEXT_TOKENS
    out = dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", tokens=tokens,
               date=time.strftime("%Y-%m-%d"))
    for name in args.models.split(","):
        try:
            bench_forward(name, COGVIDEOX[name], out)
        except Exception as e:     # keep what the other model measured
            out[f"cogvideox{name}_forward_error"] = repr(e)[:300]
        with open(f"{args.out}/cogvideox_results.json", "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
