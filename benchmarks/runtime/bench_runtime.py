"""Whole-transformer speed of the W4A4 runtime against what a user would run instead: one GPU, one run, one table.

Real configs with random weights (480p x 81 frames: 21 x 30 x 52 = 32,760 Wan tokens and 512 text tokens; 720p x
81 frames: 21 x 45 x 80 = 75,600; CogVideoX 49 frames at 480 x 720: 17,550 video + 226 text tokens), batch 1, one
forward each, in the columns of ``columns``:
- diffusers bf16 eager; diffusers + torch.compile (Wan: ``compile_repeated_blocks``; CogVideoX declares no repeated
  blocks: each transformer block compiled); diffusers with fp8 row-wise dynamic linears (``torch._scaled_mm``);
  diffusers + SageAttention (its ``sage`` attention backend; and sageattention 1.0.6 in place of SDPA);
- ours (W4A4 export format, random codes): bf16 attention (SDPA), unfused; int8 self-attention (Wan's
  cross-attention to the text stays SDPA: ``attention.cross_attention_mode``) with the fused
  norm/quantization/epilogue kernels; the same + CUDA graph.
Every column reports median ms of CUDA-event-timed forwards, peak allocated memory and weight bytes. A model timed on
a subset of its blocks is scaled by blocks / subset (Wan-14B: ``--wan14b-blocks`` of 40; at 720p
``--wan14b-720p-blocks``; CogVideoX-5B ``--cogvideox5b-blocks`` of 42, all 42 by default; the embeddings and head
are then counted that many times too: a slight overestimate for every column alike). Also: attention alone against
SDPA (``bench_attention``), a quality row (``quality``), a profile of what is left, and a 50-step sampling loop of
Wan-1.3B (``bench_sampling``).

Sections run in the order given, the measured ones of the 2026-12-05 run first; each new one is skipped, with the
reason recorded, when the budget left is below its minimum (``SECTION_MIN_S``), and every column checks the budget
again before it starts.

    python benchmarks/runtime/bench_runtime.py --out DIR [--budget-s 420] [--sections attention,wan1.3b,...]
    TRITON_INTERPRET=1 python benchmarks/runtime/bench_runtime.py --out DIR --tiny      # CPU dry run of the plumbing
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from bench_attention import (bench_attention, bench_attention_sweep, bench_sage_attention,  # noqa: E402
                             fastest_gluon_config)
from bench_sampling import bench_sampling  # noqa: E402
from captured import captured_attention  # noqa: E402
from bench_wan import breakdown, build  # noqa: E402
from columns import (COLUMNS, DEVICE, GLUON_COLUMNS, RUNTIMES, SAGE_COLUMNS, START, inputs, left, make,  # noqa: E402
                     measure, sync)
from columns import add_speedups, run_columns  # noqa: E402
from quality import flow_quality  # noqa: E402

WAN_14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824)
MODELS = {
    "wan1.3b": dict(kind="wan", cfg=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
                    latent=(1, 16, 21, 60, 104), text=(1, 512, 4096), scale=1),
    "wan14b": dict(kind="wan", cfg=dict(WAN_14B, num_layers=4), latent=(1, 16, 21, 60, 104), text=(1, 512, 4096),
                   scale=10),
    "cogvideox2b": dict(kind="cogvideox", cfg=dict(num_attention_heads=30, attention_head_dim=64, num_layers=30),
                        latent=(1, 13, 16, 60, 90), text=(1, 226, 4096), scale=1),
    # 720p x 81 frames through the Wan VAE: 21 x 90 x 160 latents
    "wan14b_720p": dict(kind="wan", cfg=dict(WAN_14B, num_layers=2), latent=(1, 16, 21, 90, 160),
                        text=(1, 512, 4096), scale=20, column_min_s=45),
    # CogVideoX-5B T2V: 48 x 64 heads, 42 layers, 3D RoPE (no learned positions); the other fields are diffusers'
    # defaults, which the 5B shares with the 2B (time_embed_dim 512, text 4096, patch 2, sample 60 x 90 x 49)
    "cogvideox5b": dict(kind="cogvideox", cfg=dict(num_attention_heads=48, attention_head_dim=64, num_layers=42,
                                                   use_rotary_positional_embeddings=True),
                        latent=(1, 13, 16, 60, 90), text=(1, 226, 4096), scale=1, column_min_s=45),
}
TINY = {
    "wan": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=96, num_layers=2, text_dim=32, freq_dim=32,
                in_channels=4, out_channels=4),
    "cogvideox": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, time_embed_dim=16, text_embed_dim=32,
                      in_channels=4, out_channels=4, sample_height=8, sample_width=8, max_text_seq_length=8),
}
NEW_MODEL_COLUMNS = COLUMNS + SAGE_COLUMNS + GLUON_COLUMNS
SAGE_MODELS = ("wan1.3b", "wan14b", "cogvideox2b")      # the sage section adds its columns to these rows
SECTIONS = ("attention,sweep,wan1.3b,quality,profile,wan14b,cogvideox2b,sage,sampling,wan14b_720p,cogvideox5b,"
            "captured,gluon")
SECTION_MIN_S = dict(sweep=60, sage=60, sampling=90, wan14b_720p=120, cogvideox5b=120, captured=60,
                     gluon=60)   # others: 20 s
CAPTURED_MODELS = ("wan1.3b", "wan14b", "wan14b_720p", "cogvideox2b", "cogvideox5b")
COMPILE_MIN_S = 150         # compile takes ~1 min, then the forwards


def bench_model(name: str, spec: dict, out: dict, budget: float, reps: int, save, columns=COLUMNS,
                attention_config=None):
    res = out.setdefault(name, {})
    run_columns(res, columns, lambda c: COMPILE_MIN_S if c == "diffusers_compile" else spec.get("column_min_s", 20),
                lambda c: measure(c, spec, reps, attention_config), name, budget, save)
    add_speedups(res, "ms")


def run_section(section: str, args, out: dict, save):
    if section == "attention":
        bench_attention(out, args.tiny, save)
    elif section == "sweep":
        bench_attention_sweep(out, args.tiny, save)
    elif section == "gluon":        # last: a kernel that has never run could hang the process
        bench_attention_sweep(out, args.tiny, save, gluon=True, shortlist=args.gluon_shortlist)
        columns = GLUON_COLUMNS[:1] if args.skip_gluon_gemm else GLUON_COLUMNS
        for name, spec in MODELS.items():       # each model with the quickest Gluon tiles at its head dim
            if name in out:
                bench_model(name, spec, out, args.budget_s, args.reps, save, columns,
                            fastest_gluon_config(out, spec["cfg"]["attention_head_dim"]))
                if args.skip_gluon_gemm:
                    out[name][GLUON_COLUMNS[1]] = dict(skipped="left out (--skip-gluon-gemm)")
    elif section in MODELS:
        columns = COLUMNS + SAGE_COLUMNS if section in ("wan14b_720p", "cogvideox5b") else COLUMNS
        bench_model(section, MODELS[section], out, args.budget_s, args.reps, save, columns)
    elif section == "captured":     # the kernel on the runtime's own q, k, v at every sequence length
        res = out.setdefault("captured_attention", {})
        for name in CAPTURED_MODELS:
            if left(args.budget_s) < 20:
                res[name] = dict(skipped=f"budget: {left(args.budget_s):.0f} s left")
                continue
            try:
                res[name] = captured_attention(MODELS[name])
            except Exception as e:
                res[name] = dict(error=repr(e)[:400])
            print("captured", name, {k: v for k, v in res[name].items() if k != "calls"}, flush=True)
            save()
    elif section == "quality":
        out["quality"] = flow_quality(MODELS["wan1.3b"], build, RUNTIMES["wan"], inputs, steps=20)
    elif section == "profile":
        model, call, _ = make("ours_int8_attn", MODELS["wan1.3b"])
        with torch.no_grad():
            out["profile_wan1.3b_ours_int8"] = breakdown(call)
            out["profile_wan1.3b_ours_int8_top"] = top_kernels(call)
        del model, call
    elif section == "sage":
        for name in SAGE_MODELS:
            if name in out:         # only next to the columns it is read against
                bench_model(name, MODELS[name], out, args.budget_s, args.reps, save, SAGE_COLUMNS)
        if DEVICE == "cuda":
            bench_sage_attention(out, save)
        else:
            out["sageattn_attention"] = dict(skipped="needs a GPU")
    elif section == "sampling":
        out["sampling_wan1.3b"] = bench_sampling(MODELS["wan1.3b"], out.get("wan1.3b", {}),
                                                 args.sampling_columns.split(","), args.sampling_steps,
                                                 args.budget_s, save)
    else:
        raise ValueError(f"unknown section {section!r}")


def cell(r: dict) -> str:
    if "ms" in r:
        return (f"{r['ms']:.1f} ms ({r.get('speedup_vs_diffusers_bf16', 0):.2f}x, "
                f"{r['weight_bytes'] / 2**30:.2f} GB w, {r['peak_gb'] or 0:.1f} GB peak)")
    return r.get("skipped") or (f"error: {r['error'][:120]}" if "error" in r else "-")


def table(out: dict) -> str:
    columns = NEW_MODEL_COLUMNS
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, spec in MODELS.items():
        if name in out:
            label = name if spec["scale"] == 1 else f"{name} (x{spec['scale']:g} of {spec['cfg']['num_layers']} blocks)"
            lines.append(f"| {label} | " + " | ".join(cell(out[name].get(c, {})) for c in columns) + " |")
    for name, r in out.get("attention", {}).items():
        if isinstance(r, dict) and "sdpa_ms" in r and "ours_kernel_ms" in r:
            lines.append(f"attention {name}: SDPA {r['sdpa_ms']:.2f} ms, ours {r['ours_kernel_ms']:.2f} ms kernel / "
                         f"{r['ours_with_quant_ms']:.2f} ms with quantization ({r['speedup_with_quant']:.2f}x), "
                         f"cosine vs SDPA {r.get('cosine_vs_sdpa', 0):.5f}"
                         + (f", Q/K passes with Wan's norm + RoPE {r['qk_passes_wan_prep_ms']:.2f} ms"
                            if "qk_passes_wan_prep_ms" in r else "")
                         + (f", sageattn 1.0.6 {r['sageattn_1_0_6_ms']:.2f} ms" if "sageattn_1_0_6_ms" in r else ""))
    sampling = out.get("sampling_wan1.3b")
    if sampling:
        parts = [f"{c}: " + (f"{r['loop_s']:.1f} s ({r.get('speedup_vs_diffusers_bf16', 0):.2f}x)" if "loop_s" in r
                             else r.get("skipped") or f"error: {r.get('error', '')[:120]}")
                 for c, r in sampling.items() if isinstance(r, dict)]
        lines.append(f"sampling wan1.3b, {sampling['steps']} steps, guidance {sampling['guidance']}: " + "; ".join(parts))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sections", default=SECTIONS)
    p.add_argument("--skip-sections", default="", help="sections to leave out (recorded as skipped, with why: "
                   "run_gpu.sh leaves out 'gluon' when the Gluon attention kernel's GPU tests did not pass)")
    p.add_argument("--skip-gluon-gemm", action="store_true", help="the gluon section without its Gluon-GEMM column "
                   "(run_gpu.sh: when the Gluon GEMM's GPU tests did not pass)")
    p.add_argument("--gluon-shortlist", action="store_true", help="the gluon section sweeps only the fastest row "
                   "per head dim of the H100 sweep (attention_sweep.GLUON_SHORTLIST) before its whole-model columns")
    p.add_argument("--wan14b-blocks", type=int, default=4)
    p.add_argument("--wan14b-720p-blocks", type=int, default=2)
    p.add_argument("--cogvideox5b-blocks", type=int, default=42)
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--sampling-columns", default="diffusers_bf16,ours_int8_attn_graph,diffusers_compile")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run under TRITON_INTERPRET=1)")
    args = p.parse_args()
    for name, blocks, total in (("wan14b", args.wan14b_blocks, 40), ("wan14b_720p", args.wan14b_720p_blocks, 40),
                                ("cogvideox5b", args.cogvideox5b_blocks, 42)):
        MODELS[name]["cfg"]["num_layers"] = blocks
        MODELS[name]["scale"] = total / blocks
    if args.tiny:
        for name, spec in MODELS.items():
            spec["cfg"].update(TINY[spec["kind"]])
            spec["latent"] = (1, 4, 2, 4, 8) if spec["kind"] == "wan" else (1, 2, 4, 8, 8)
            spec["text"] = (1, 8, 32)
            spec.pop("column_min_s", None)
        MODELS["wan14b_720p"]["latent"] = (1, 4, 2, 6, 10)
    out = dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", date=time.strftime("%Y-%m-%d"),
               torch=torch.__version__, command=" ".join(sys.argv), tiny=args.tiny,
               triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
               model_specs={k: dict(v) for k, v in MODELS.items()})
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(f"{args.out}/runtime_results.json", "w") as f:
            json.dump(out, f, indent=1, default=str)

    skip = set(filter(None, args.skip_sections.split(",")))
    for section in args.sections.split(","):
        if section in skip:
            out.setdefault("skipped_sections", {})[section] = "left out (--skip-sections)"
            save()
            continue
        need = SECTION_MIN_S.get(section, 20)
        if left(args.budget_s) < need:
            out.setdefault("skipped_sections", {})[section] = f"budget: {left(args.budget_s):.0f} s left, needs {need} s"
            save()
            continue
        t0 = time.time()
        try:
            run_section(section, args, out, save)
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
