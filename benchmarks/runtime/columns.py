"""The columns of the runtime benchmark: how each one builds its model, what one call of it is, and how it is timed.

Shared by the whole-forward sections (``bench_runtime``) and the sampling loop (``bench_sampling``) so that a
column means the same model and the same call in both. Every model gets the same inputs (``inputs``); CogVideoX
with RoPE (the 5B) gets the rotary tables as an input, as ``CogVideoXPipeline`` passes them to its transformer.
"""
from __future__ import annotations

import statistics
import time
import traceback
from typing import Callable, Optional

import torch

from baselines import SageForSdpa, diffusers_model, to_fp8_linears
from bench_wan import DEVICE, build, sync

from qvgen_kernels.cogvideox_model import CogVideoXRuntimeTransformer, cogvideox_config, rotary_positions
from qvgen_kernels.wan_model import WanRuntimeTransformer
from qvgen_kernels.triton_env import gluon_runs_on

COLUMNS = ("diffusers_bf16", "diffusers_compile", "diffusers_fp8", "ours_bf16_attn", "ours_int8_attn",
           "ours_int8_attn_graph")
# the "gluon" section adds these to the rows measured before: Gluon attention, then Gluon attention and GEMMs
GLUON_COLUMNS = ("ours_gluon_attn_graph", "ours_gluon_all_graph")

SAGE_COLUMNS = ("diffusers_sage", "diffusers_sageattn_sdpa")
RUNTIMES = {"wan": WanRuntimeTransformer, "cogvideox": CogVideoXRuntimeTransformer}
START = time.time()


def left(budget: float) -> float:
    """Seconds of ``budget`` left since this module was imported (the start of the run)."""
    return budget - (time.time() - START)


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


def unavailable(column: str) -> Optional[str]:
    """Why ``column`` cannot run on this machine (None: it can). The diffusers ``sage`` backend is tried anywhere:
    its refusal (the package or its version) is the answer the column reports."""
    if DEVICE != "cuda" and column in ("diffusers_compile", "diffusers_fp8", "ours_int8_attn_graph",
                                       "diffusers_sageattn_sdpa") + GLUON_COLUMNS:
        return "needs a GPU"
    if column in GLUON_COLUMNS and not gluon_runs_on(torch.empty(0, device=DEVICE)):
        return "the Gluon kernels are written for Hopper (sm_90)"
    return None


def inputs(spec: dict):
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    latents = torch.randn(*spec["latent"], device=DEVICE, generator=gen).to(torch.bfloat16)
    text = torch.randn(*spec["text"], device=DEVICE, generator=gen).to(torch.bfloat16)
    return latents, text, torch.tensor([937.0], device=DEVICE)


def rotary_tables(spec: dict):
    """CogVideoX-5B's (cos, sin) for the spec's latent grid (None for the models without RoPE)."""
    if spec["kind"] != "cogvideox" or not spec["cfg"].get("use_rotary_positional_embeddings"):
        return None
    cfg = cogvideox_config(spec["cfg"])
    _, frames, _, height, width = spec["latent"]
    grid = (frames, height // cfg.patch_size, width // cfg.patch_size)
    return tuple(t.to(DEVICE) for t in rotary_positions(cfg, grid))


def make(column: str, spec: dict, attention_config=None):
    """(model, call, notes) of one column; ``notes`` (a dict) says how the column was made where that is not
    obvious, and the sage column counts its calls there. ``attention_config``: the Gluon column's tiles (default
    ``AttentionConfig.gluon()``)."""
    kind, cfg = spec["kind"], spec["cfg"]
    latents, text, t = inputs(spec)
    notes = {}
    wrap = None
    if column.startswith("diffusers"):
        model = diffusers_model(kind, cfg, DEVICE)
        if column == "diffusers_compile" and kind == "wan":
            model.compile_repeated_blocks(fullgraph=True)
        elif column == "diffusers_compile":
            for block in model.transformer_blocks:      # diffusers declares no _repeated_blocks for CogVideoX
                block.compile(fullgraph=True)
            notes["how"] = "torch.compile(fullgraph=True) of each transformer block (no _repeated_blocks declared)"
        if column == "diffusers_fp8":
            to_fp8_linears(model, "blocks" if kind == "wan" else "transformer_blocks")
        if column == "diffusers_sage":
            model.set_attention_backend("sage")     # diffusers raises if the installed sageattention is too old
            notes["dispatcher_attention_modules"] = sum(hasattr(getattr(m, "processor", None), "_attention_backend")
                                                        for m in model.modules())
        if column == "diffusers_sageattn_sdpa":
            wrap = SageForSdpa()
            notes["how"] = SageForSdpa.HOW
            notes["calls"] = wrap.calls
    else:
        from qvgen_kernels.attention_triton import AttentionConfig
        fast = "int8" in column or "gluon" in column
        config = (attention_config or AttentionConfig.gluon()) if "gluon" in column else None
        if config is not None:
            notes["attention_config"] = dict(config.__dict__)
        model = build(RUNTIMES[kind], cfg, quantized=True).set_attention("int8" if fast else "bf16", config=config)
        model.set_fusion(fast)
        if column == "ours_gluon_all_graph":
            model.set_gemm("gluon")
            notes["gemm"] = "gluon (qgemm_gluon) at each shape's default tiles"
        if column.endswith("graph"):
            model.enable_cuda_graphs()
    if kind == "wan":
        def forward():
            return model(latents, t, text, return_dict=False)[0]
    else:
        rope = rotary_tables(spec)

        def forward():
            return model(latents, text, t, image_rotary_emb=rope, return_dict=False)[0]
    if wrap is None:
        return model, forward, notes

    def wrapped():
        with wrap:
            return forward()
    return model, wrapped, notes


@torch.no_grad()
def measure(column: str, spec: dict, reps: int, attention_config=None) -> dict:
    """Median of ``reps`` timed forwards after two untimed ones (compile / capture, then warm), times the spec's
    ``scale`` (the blocks a subset stands for)."""
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, call, notes = make(column, spec, attention_config)
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
    if notes:
        res["notes"] = dict(notes, forwards=reps + 2) if "calls" in notes else notes
    del model, call, y
    return res


def run_columns(res: dict, columns, need_s: Callable[[str], float], run: Callable[[str], dict], label: str,
                budget: float, save) -> None:
    """Each column into ``res``: skipped with the reason when it cannot run here or the budget left is below
    ``need_s(column)``; an error is recorded and the next column still runs; ``save()`` after each."""
    for column in columns:
        need = need_s(column)
        reason = unavailable(column) or (f"budget: {left(budget):.0f} s left, needs ~{need:.0f} s"
                                         if left(budget) < need else None)
        if reason:
            res[column] = dict(skipped=reason)
            continue
        try:
            res[column] = run(column)
        except Exception as e:      # keep the other columns
            res[column] = dict(error=repr(e)[:400], trace=traceback.format_exc()[-1500:])
        print(label, column, {k: v for k, v in res[column].items() if k not in ("trace", "ms_runs")}, flush=True)
        save()


def add_speedups(res: dict, key: str) -> None:
    """``speedup_vs_diffusers_bf16`` of every column with a ``key`` time, against the diffusers bf16 column's."""
    base = res.get("diffusers_bf16", {}).get(key)
    for column in res:
        if base and isinstance(res[column], dict) and res[column].get(key):
            res[column]["speedup_vs_diffusers_bf16"] = round(base / res[column][key], 3)
