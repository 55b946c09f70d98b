"""Wan runtime benchmark: one Wan-14B-width block and the Wan-1.3B real-config forward, W4A4 vs bf16.

Both sides are ``WanRuntimeTransformer`` (the bf16 side has plain ``nn.Linear``: diffusers' math, checked
equal to diffusers in tests/test_runtime_wan.py), bf16 attention through ``F.scaled_dot_product_attention``,
random weights (random codes and scales on the quantized side), 480p x 81 frames: 21 x 30 x 52 = 32760 tokens,
512 text tokens. A CUDA-time breakdown by kernel family of each quantized run says what limits it.

    python benchmarks/kernels/bench_wan.py --out DIR [--skip-14b] [--skip-1.3b]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from triton.testing import do_bench

from qvgen_kernels.context import timestep_groups
from qvgen_kernels.format import QuantizationConfig
from qvgen_kernels.linear import QuantizedLinear
from qvgen_kernels.wan_model import WanRuntimeTransformer

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
WAN_14B_ONE_BLOCK = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=1)
LATENT = (21, 60, 104)        # 81 frames at 480 x 832 through the Wan VAE (4x temporal, 8x spatial)
TEXT_TOKENS = 512
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"    # cpu: a dry run of this script (--tiny)


def timed(fn) -> float:
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=5, rep=60, return_mode="median")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def build(model_cls, cfg: dict, quantized: bool):
    """A runtime model with random weights; the quantized one gets random packed codes, scales and zero points."""
    torch.manual_seed(0)
    with torch.device(DEVICE):             # parameters and buffers made on the device (fast for 1B+ models)
        plain = model_cls(cfg, None)
    for p in plain.parameters():
        p.normal_(0, 0.02)
    if not quantized:
        return plain
    shapes = {n: (m.out_features, m.in_features) for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    quant = QuantizationConfig(weight_bits=4, act_bits=4, act_clip_ratio=0.95, num_timestep_groups=50,
                               module_shapes=shapes)
    with torch.device(DEVICE):
        model = model_cls(cfg, quant)
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.weight_codes.copy_(torch.randint(0, 256, m.weight_codes.shape, dtype=torch.uint8, device=DEVICE))
            m.weight_scale.copy_(torch.rand_like(m.weight_scale) * 0.02 / 7.5 + 1e-4)
            m.weight_zero.copy_(7.5 + torch.randn_like(m.weight_zero) * 0.3)
            m.act_clip_lower.fill_(0.9)
            m.act_clip_upper.fill_(0.9)
            if m.bias is not None:
                m.bias.normal_(0, 0.02)
            m.refresh_derived()
    model.load_plain_tensors({k: v for k, v in plain.state_dict().items() if k.rpartition(".")[0] not in shapes})
    return model


def compare_forward(model_cls, cfg: dict, call, expected_shape) -> dict:
    """bf16 vs W4A4 runtime forward of one model: median of 3 times, kernel breakdown, weight bytes."""
    res = {}
    for quantized in (False, True):
        model = build(model_cls, cfg, quantized)

        def run():
            with torch.no_grad():
                return call(model)
        y = run()
        assert y.shape == expected_shape and torch.isfinite(y).all()
        key = "w4a4" if quantized else "bf16"
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        res[f"{key}_ms"] = sorted(times)[1]
        res[f"{key}_breakdown_ms"] = breakdown(run)
        res[f"{key}_weight_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers()) + \
            sum(p.numel() * p.element_size() for p in model.parameters())
        model = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    res["speedup"] = res["bf16_ms"] / res["w4a4_ms"]
    res["weight_bytes_ratio"] = res["w4a4_weight_bytes"] / res["bf16_weight_bytes"]
    return res


def family(kernel: str) -> str:
    k = kernel.lower()
    if k.startswith("_gemm_ptr_kernel") or k.startswith("_gemm_tma"):
        return "w4a4 gemm"
    if k.startswith("_act_quant"):
        return "act quant"
    if k.startswith("_norm_quant"):
        return "norm + act quant"
    if k.startswith("_attention_kernel"):
        return "int8 attention"
    if k.startswith("_qk_pass") or k.startswith("_v_pass"):
        return "attention quant"
    if k.startswith("_unpack_kernel"):
        return "weight unpack"
    if any(s in k for s in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(s in k for s in ("gemm", "xmma", "nvjet", "cutlass", "sm90")):
        return "bf16 gemm"
    return "other"


def breakdown(fn) -> dict:
    if DEVICE == "cpu":
        return {}
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = defaultdict(float)
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        total[family(evt.key)] += t / 1e3
    return {k: round(v, 3) for k, v in sorted(total.items(), key=lambda kv: -kv[1]) if v > 0}


def bench_block(out: dict):
    f, h, w = LATENT[0], LATENT[1] // 2, LATENT[2] // 2
    res = {}
    for quantized in (False, True):
        model = build(WanRuntimeTransformer, WAN_14B_ONE_BLOCK, quantized)
        dim = WAN_14B_ONE_BLOCK["num_attention_heads"] * WAN_14B_ONE_BLOCK["attention_head_dim"]
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        x = torch.randn(1, f * h * w, dim, device=DEVICE, generator=gen).to(torch.bfloat16)
        ctx = torch.randn(1, TEXT_TOKENS, dim, device=DEVICE, generator=gen).to(torch.bfloat16)
        temb6 = (torch.randn(1, 6, dim, device=DEVICE, generator=gen) * 0.1).to(torch.bfloat16)
        rope = model._rope(f, h, w)
        block = model.blocks[0]

        def run():
            with timestep_groups(torch.tensor([7], device=DEVICE)), torch.no_grad():
                return block(x, ctx, temb6, rope)
        y = run()
        assert torch.isfinite(y).all()
        key = "w4a4" if quantized else "bf16"
        res[f"{key}_ms"] = timed(run)
        res[f"{key}_breakdown_ms"] = breakdown(run)
        model = block = x = ctx = None     # free before the other variant is built
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    res["speedup"] = res["bf16_ms"] / res["w4a4_ms"]
    out["wan14b_block"] = res


def bench_forward(out: dict):
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    latents = torch.randn(1, 16, *LATENT, device=DEVICE, generator=gen).to(torch.bfloat16)
    text = torch.randn(1, TEXT_TOKENS, 4096, device=DEVICE, generator=gen).to(torch.bfloat16)
    t = torch.tensor([937.0], device=DEVICE)
    out["wan1.3b_forward"] = compare_forward(WanRuntimeTransformer, WAN_1_3B,
                                             lambda m: m(latents, t, text, return_dict=False)[0], latents.shape)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--skip-14b", action="store_true")
    p.add_argument("--skip-1.3b", dest="skip_small", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run under TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.tiny:
        global LATENT, TEXT_TOKENS
        tiny = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=96, num_layers=2)
        WAN_1_3B.update(tiny)
        WAN_14B_ONE_BLOCK.update({**tiny, "num_layers": 1})
        LATENT, TEXT_TOKENS = (2, 4, 8), 8
    out = dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", tokens=LATENT[0] * LATENT[1] * LATENT[2] // 4,
               date=time.strftime("%Y-%m-%d"))
    for skip, fn in ((args.skip_14b, bench_block), (args.skip_small, bench_forward)):
        if skip:
            continue
        try:
            fn(out)
        except Exception as e:     # keep what the other part measured
            out[fn.__name__ + "_error"] = repr(e)[:300]
        with open(f"{args.out}/wan_results.json", "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
