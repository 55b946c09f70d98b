"""Whole-transformer speed of the W4A4 runtime against what a user would run instead: one GPU, one run, one table.

Real configs with random weights (480p x 81 frames: 21 x 30 x 52 = 32,760 Wan tokens and 512 text tokens; CogVideoX
49 frames at 480 x 720: 17,550 video + 226 text tokens), batch 1, one forward each:
- diffusers bf16 eager; diffusers with ``compile_repeated_blocks`` (torch.compile); diffusers with fp8 row-wise
  dynamic linears (``torch._scaled_mm``, eager quantization);
- ours (W4A4 export format, random codes): bf16 attention (SDPA), unfused (the runtime's default today); int8
  self-attention (Wan's cross-attention to the text stays SDPA: ``attention.cross_attention_mode``) with the fused
  norm/quantization/epilogue kernels; the same + CUDA graph.
Every column reports median ms of CUDA-event-timed forwards, peak allocated memory and weight bytes. Wan-14B is
timed on ``--wan14b-blocks`` of its 40 blocks and scaled by 40 / blocks (the embeddings and head are counted
that many times too: a slight overestimate for every column alike). Also: attention alone against SDPA (ours with
and without its quantization passes, the Q/K passes alone with Wan's RMSNorm + RoPE, and a tile sweep), a quality row (final latent after a 20-step flow-matching
loop, int8 vs bf16 attention, on the Wan-1.3B-width W4A4 model), and a profile of what is left.

    python benchmarks/runtime/bench_runtime.py --out DIR [--budget-s 420] [--sections attention,wan1.3b,...]
    TRITON_INTERPRET=1 python benchmarks/runtime/bench_runtime.py --out DIR --tiny      # CPU dry run of the plumbing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from baselines import diffusers_model, to_fp8_linears  # noqa: E402
from bench_wan import breakdown, build  # noqa: E402
import bench_wan  # noqa: E402

from qvgen_kernels.attention import sdpa  # noqa: E402
from qvgen_kernels.cogvideox_model import CogVideoXRuntimeTransformer  # noqa: E402
from qvgen_kernels.wan_model import WanRuntimeTransformer  # noqa: E402
from quality import attention_quality, flow_quality  # noqa: E402

DEVICE = bench_wan.DEVICE
MODELS = {
    "wan1.3b": dict(kind="wan", cfg=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
                    latent=(1, 16, 21, 60, 104), text=(1, 512, 4096), scale=1),
    "wan14b": dict(kind="wan", cfg=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=4),
                   latent=(1, 16, 21, 60, 104), text=(1, 512, 4096), scale=10),
    "cogvideox2b": dict(kind="cogvideox", cfg=dict(num_attention_heads=30, attention_head_dim=64, num_layers=30),
                        latent=(1, 13, 16, 60, 90), text=(1, 226, 4096), scale=1),
}
TINY = {
    "wan": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=96, num_layers=2, text_dim=32, freq_dim=32,
                in_channels=4, out_channels=4),
    "cogvideox": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, time_embed_dim=16, text_embed_dim=32,
                      in_channels=4, out_channels=4, sample_height=8, sample_width=8, max_text_seq_length=8),
}
COLUMNS = ("diffusers_bf16", "diffusers_compile", "diffusers_fp8", "ours_bf16_attn", "ours_int8_attn",
           "ours_int8_attn_graph")
RUNTIMES = {"wan": WanRuntimeTransformer, "cogvideox": CogVideoXRuntimeTransformer}
START = time.time()


def left(budget: float) -> float:
    return budget - (time.time() - START)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, reps: int) -> list:
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def inputs(spec: dict):
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    latents = torch.randn(*spec["latent"], device=DEVICE, generator=gen).to(torch.bfloat16)
    text = torch.randn(*spec["text"], device=DEVICE, generator=gen).to(torch.bfloat16)
    return latents, text, torch.tensor([937.0], device=DEVICE)


def make(column: str, spec: dict):
    """(model, call) of one column."""
    kind, cfg = spec["kind"], spec["cfg"]
    latents, text, t = inputs(spec)
    if column.startswith("diffusers"):
        model = diffusers_model(kind, cfg, DEVICE)
        if column == "diffusers_compile":
            model.compile_repeated_blocks(fullgraph=True)
        if column == "diffusers_fp8":
            to_fp8_linears(model, "blocks" if kind == "wan" else "transformer_blocks")
    else:
        fast = "int8" in column
        model = build(RUNTIMES[kind], cfg, quantized=True).set_attention("int8" if fast else "bf16").set_fusion(fast)
        if column.endswith("graph"):
            model.enable_cuda_graphs()
    if kind == "wan":
        return model, lambda: model(latents, t, text, return_dict=False)[0]
    return model, lambda: model(latents, text, t, return_dict=False)[0]


@torch.no_grad()
def measure(column: str, spec: dict, reps: int) -> dict:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, call = make(column, spec)
    build_s = time.time() - t0
    t0 = time.time()
    y = call()                       # compiles / captures
    sync()
    first_s = time.time() - t0
    assert torch.isfinite(y.float()).all(), f"{column}: non-finite output"
    call()
    ms = time_calls(call, reps)
    res = dict(ms=statistics.median(ms) * spec["scale"], ms_runs=[round(m, 3) for m in ms], build_s=round(build_s, 1),
               first_call_s=round(first_s, 1), weight_bytes=nbytes(model) * spec["scale"],
               peak_gb=torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None)
    del model, call, y
    return res


def bench_model(name: str, spec: dict, out: dict, budget: float, reps: int, save):
    res = out.setdefault(name, {})
    for column in COLUMNS:
        if column == "diffusers_compile" and (DEVICE != "cuda" or left(budget) < 150):
            res[column] = dict(skipped="no GPU" if DEVICE != "cuda" else "budget (compile takes ~1 min)")
            continue
        if column in ("diffusers_fp8", "ours_int8_attn_graph") and DEVICE != "cuda":
            res[column] = dict(skipped="needs a GPU")
            continue
        if left(budget) < 20:
            res[column] = dict(skipped="budget")
            continue
        try:
            res[column] = measure(column, spec, reps)
        except Exception as e:      # keep the other columns
            res[column] = dict(error=repr(e)[:400], trace=traceback.format_exc()[-1500:])
        print(name, column, {k: v for k, v in res[column].items() if k not in ("trace", "ms_runs")}, flush=True)
        save()
    base = res.get("diffusers_bf16", {}).get("ms")
    for column in COLUMNS:
        if base and res.get(column, {}).get("ms"):
            res[column]["speedup_vs_diffusers_bf16"] = round(base / res[column]["ms"], 3)


def bench_attention(out: dict, tiny: bool, save):
    from qvgen_kernels.attention_triton import (AttentionConfig, attention_from_codes, default_config, quantize_k,
                                                quantize_q, quantize_qkv)
    from triton.testing import do_bench
    shapes = [("wan1.3b_self", 32760, 32760, 12, 128), ("wan14b_self", 32760, 32760, 40, 128),
              ("wan14b_cross", 32760, 512, 40, 128), ("wan14b_720p_self", 75600, 75600, 40, 128),
              ("cogvideox2b_joint", 17776, 17776, 30, 64)]
    # tile sweeps per head dim (SageAttention's (128, 64, 8, 4) / (128, 64, 4, 3) included; 64-row tiles let 2-3
    # programs share an SM, so one's softmax overlaps another's matrix work)
    sweeps = {128: [(128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                    (64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3)],
              64: [(128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3)]}
    sweep_shapes = [1, 4]     # wan14b_self (d = 128), cogvideox2b_joint (d = 64)
    if tiny:
        shapes = [("wan_tiny_self", 100, 100, 2, 64), ("wan_tiny_cross", 100, 20, 2, 64)]
        sweeps = {64: [(32, 32, 4, 2), (32, 16, 4, 2)]}
        sweep_shapes = [0]
    bench = (lambda f: do_bench(f, warmup=3, rep=100, return_mode="median")) if DEVICE == "cuda" else \
        (lambda f: statistics.median(time_calls(f, 2)))
    res = out.setdefault("attention", {})
    for name, SQ, SK, H, D in shapes:
        gen = torch.Generator(device=DEVICE).manual_seed(SQ)
        q, k, v = (torch.randn(1, s, H, D, device=DEVICE, generator=gen).to(torch.bfloat16) for s in (SQ, SK, SK))
        row = dict(tokens=SQ, kv_tokens=SK, heads=H, head_dim=D, flop=4 * SQ * SK * H * D)
        try:
            row["sdpa_ms"] = bench(lambda: sdpa(q, k, v))
            qkv = quantize_qkv(q, k, v)
            o = torch.empty_like(q)
            row["ours_kernel_ms"] = bench(lambda: attention_from_codes(qkv, o))
            row["ours_with_quant_ms"] = bench(lambda: attention_from_codes(quantize_qkv(q, k, v), o))
            row["speedup_kernel"] = row["sdpa_ms"] / row["ours_kernel_ms"]
            row["speedup_with_quant"] = row["sdpa_ms"] / row["ours_with_quant_ms"]
            row["tflops_sdpa"] = row["flop"] / row["sdpa_ms"] / 1e9
            row["tops_ours_kernel"] = row["flop"] / row["ours_kernel_ms"] / 1e9
            row.update(attention_quality(q, k, v, attention_from_codes(qkv, o).clone()))
            if name.startswith("wan") and SQ == SK:      # Wan's self-attention prep: the rstd pass + per-head passes
                qp, kp = wan_preps(SQ, H, D)
                row["qk_passes_wan_prep_ms"] = bench(lambda: (quantize_q(q, qp),
                                                              quantize_k(k, default_config(D).block_n, kp)))
        except Exception as e:
            row["error"] = repr(e)[:400]
        res[name] = row
        print("attention", name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        save()
        q = k = v = None        # frees them (not ``del``: pyflakes reads the lambdas above as using deleted names)
    for index in sweep_shapes:
        name, SQ, SK, H, D = shapes[index]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = (torch.randn(1, s, H, D, device=DEVICE, generator=gen).to(torch.bfloat16) for s in (SQ, SK, SK))
        o = torch.empty_like(q)
        sweep_res = []
        for cfg in (AttentionConfig(*t) for t in sweeps[D]):
            try:
                qkv = quantize_qkv(q, k, v, config=cfg)
                sweep_res.append(dict(config=cfg.__dict__, kernel_ms=bench(lambda: attention_from_codes(qkv, o, cfg))))
            except Exception as e:
                sweep_res.append(dict(config=cfg.__dict__, error=repr(e)[:300]))
        res["sweep_" + name] = sweep_res
        print("attention sweep", name, sweep_res, flush=True)
        save()
        q = k = v = None


def wan_preps(S: int, H: int, D: int):
    """QKPrep of Wan's q and k: RMSNorm across the heads (random weights) and random rotary tables."""
    from qvgen_kernels.attention import QKPrep
    gen = torch.Generator(device=DEVICE).manual_seed(S)
    angles = torch.rand(S, D // 2, device=DEVICE, generator=gen) * 6.3
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    return tuple(QKPrep("rms_row", 1 + 0.1 * torch.randn(H * D, device=DEVICE, generator=gen), cos=cos, sin=sin)
                 for _ in range(2))


def table(out: dict) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in MODELS:
        if name not in out:
            continue
        cells = []
        for column in COLUMNS:
            r = out[name].get(column, {})
            if "ms" in r:
                cells.append(f"{r['ms']:.1f} ms ({r.get('speedup_vs_diffusers_bf16', 0):.2f}x, "
                             f"{r['weight_bytes'] / 2**30:.2f} GB w, {r['peak_gb'] or 0:.1f} GB peak)")
            else:
                cells.append(r.get("skipped") or "error")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    att = out.get("attention", {})
    for name, r in att.items():
        if isinstance(r, dict) and "sdpa_ms" in r and "ours_kernel_ms" in r:
            lines.append(f"attention {name}: SDPA {r['sdpa_ms']:.2f} ms, ours {r['ours_kernel_ms']:.2f} ms kernel / "
                         f"{r['ours_with_quant_ms']:.2f} ms with quantization ({r['speedup_with_quant']:.2f}x), "
                         f"cosine vs SDPA {r.get('cosine_vs_sdpa', 0):.5f}"
                         + (f", Q/K passes with Wan's norm + RoPE {r['qk_passes_wan_prep_ms']:.2f} ms"
                            if "qk_passes_wan_prep_ms" in r else ""))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sections", default="attention,wan1.3b,quality,profile,wan14b,cogvideox2b")
    p.add_argument("--wan14b-blocks", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run under TRITON_INTERPRET=1)")
    args = p.parse_args()
    MODELS["wan14b"]["cfg"]["num_layers"] = args.wan14b_blocks
    MODELS["wan14b"]["scale"] = 40 / args.wan14b_blocks
    if args.tiny:
        for spec in MODELS.values():
            spec["cfg"].update(TINY[spec["kind"]])
            spec["latent"] = (1, 4, 2, 4, 8) if spec["kind"] == "wan" else (1, 2, 4, 8, 8)
            spec["text"] = (1, 8, 32)
    out = dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", date=time.strftime("%Y-%m-%d"),
               torch=torch.__version__, command=" ".join(sys.argv), tiny=args.tiny,
               triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(f"{args.out}/runtime_results.json", "w") as f:
            json.dump(out, f, indent=1, default=str)

    for section in args.sections.split(","):
        if left(args.budget_s) < 20:
            out.setdefault("skipped_sections", []).append(section)
            continue
        t0 = time.time()
        try:
            if section == "attention":
                bench_attention(out, args.tiny, save)
            elif section in MODELS:
                bench_model(section, MODELS[section], out, args.budget_s, args.reps, save)
            elif section == "quality":
                out["quality"] = flow_quality(MODELS["wan1.3b"], build, RUNTIMES["wan"], inputs, steps=20)
            elif section == "profile":
                spec = MODELS["wan1.3b"]
                model, call = make("ours_int8_attn", spec)
                with torch.no_grad():
                    out["profile_wan1.3b_ours_int8"] = breakdown(call)
                    out["profile_wan1.3b_ours_int8_top"] = top_kernels(call)
                del model, call
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception as e:
            out[f"{section}_error"] = repr(e)[:400]
            out[f"{section}_trace"] = traceback.format_exc()[-2000:]
        out.setdefault("section_s", {})[section] = round(time.time() - t0, 1)
        save()
    text = table(out)
    print(text)
    with open(f"{args.out}/runtime_table.md", "w") as f:
        f.write(text + "\n")
    print(f"total {time.time() - START:.0f} s")


def top_kernels(fn, n: int = 15) -> list:
    if DEVICE != "cuda":
        return []
    fn()
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    rows = [(evt.key, getattr(evt, "self_device_time_total", 0.0) / 1e3, evt.count) for evt in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    return [dict(kernel=k[:90], ms=round(ms, 3), calls=c) for k, ms, c in rows[:n]]


if __name__ == "__main__":
    main()
