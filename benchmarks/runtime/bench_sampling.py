"""Time of a whole sampling loop (transformer only) for one model spec: what a user waits for per video, where one
forward's speed-up is diluted by nothing but the sampler's own element-wise work.

The loop is ``quality.flow_sample``: ``steps`` Euler steps of a flow-matching sampler with Wan's shifted sigmas,
the state in float32, classifier-free guidance OFF (one batch-1 forward per step; guidance would double the
forwards of every column alike). One untimed forward first (compile / CUDA-graph capture), then the loop timed once
with CUDA events. A column is skipped, with the reason recorded, when the budget left cannot hold it: its estimate
is ``steps`` times the column's whole-forward time from the same run (or ``FALLBACK_STEP_S`` without one) plus the
build, and a minute more for torch.compile.
"""
from __future__ import annotations

import time

import torch

from columns import DEVICE, add_speedups, inputs, make, nbytes, run_columns, sync, time_calls
from quality import flow_sample

FALLBACK_STEP_S = 1.0      # per step when the forward was not timed in this run (Wan-1.3B eager: 0.61 s on H200)
BUILD_S = 30               # build + the untimed forward of a 1.3B model
COMPILE_S = 90


def estimate_s(column: str, forward: dict, steps: int) -> float:
    ms = forward.get(column, {}).get("ms")
    step_s = ms / 1e3 if ms else FALLBACK_STEP_S
    return steps * step_s * 1.15 + BUILD_S + (COMPILE_S if column == "diffusers_compile" else 0)


@torch.no_grad()
def time_loop(column: str, spec: dict, steps: int) -> dict:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, call, _ = make(column, spec)
    call()
    sync()
    warm_s = time.time() - t0
    latents, text, _ = inputs(spec)
    final = []
    ms = time_calls(lambda: final.append(flow_sample(model, latents, text, steps)), 1)[0]
    assert torch.isfinite(final[0]).all(), f"{column}: non-finite final latent"
    res = dict(loop_s=round(ms / 1e3, 3), per_step_ms=round(ms / steps, 2), build_and_first_call_s=round(warm_s, 1),
               weight_bytes=nbytes(model),
               peak_gb=torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None)
    model = call = final = None     # frees them (`del` would confuse pyflakes: the lambda above uses them)
    return res


def bench_sampling(spec: dict, forward: dict, columns: list, steps: int, budget: float, save) -> dict:
    """``forward``: the same model's whole-forward results of this run (for the estimates)."""
    res = dict(steps=steps, guidance="off (one forward per step)", sampler="flow-matching Euler, shift 3",
               latent=list(spec["latent"]))
    run_columns(res, columns, lambda c: estimate_s(c, forward, steps), lambda c: time_loop(c, spec, steps),
                "sampling", budget, save)
    add_speedups(res, "loop_s")
    return res
