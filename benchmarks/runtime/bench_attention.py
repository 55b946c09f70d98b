"""Attention alone, bf16 SDPA against ours (the int8 Q.K / fp8 P.V kernel, with and without its quantization
passes), at the sequence lengths of the benchmarked models; a tile sweep; and SageAttention 1.0.6's ``sageattn``
(PyPI's Triton-only wheel) at the same shapes, so the "diffusers + SageAttention" columns can be read against
what its kernel does alone."""
from __future__ import annotations

import statistics

import torch

from columns import DEVICE, time_calls
from quality import attention_quality, cosine

from attention_sweep import GLUON_SHORTLIST, GLUON_SWEEP, SWEEP_SHAPES, SWEEPS, TINY_SWEEPS
from qvgen_kernels.attention import sdpa


SHAPES = [("wan1.3b_self", 32760, 32760, 12, 128), ("wan14b_self", 32760, 32760, 40, 128),
          ("wan14b_cross", 32760, 512, 40, 128), ("wan14b_720p_self", 75600, 75600, 40, 128),
          ("cogvideox2b_joint", 17776, 17776, 30, 64)]
TINY_SHAPES = [("wan_tiny_self", 100, 100, 2, 64), ("wan_tiny_cross", 100, 20, 2, 64)]
def _bench():
    from triton.testing import do_bench
    return (lambda f: do_bench(f, warmup=3, rep=100, return_mode="median")) if DEVICE == "cuda" else \
        (lambda f: statistics.median(time_calls(f, 2)))


def bench_attention(out: dict, tiny: bool, save):
    """SDPA vs ours at each shape (default tiles)."""
    from qvgen_kernels.attention_triton import attention_from_codes, default_config, quantize_k, quantize_q, quantize_qkv
    bench = _bench()
    res = out.setdefault("attention", {})
    for name, SQ, SK, H, D in (TINY_SHAPES if tiny else SHAPES):
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


def bench_attention_sweep(out: dict, tiny: bool, save, gluon: bool = False, shortlist: bool = False):
    """The kernel alone at every tile shape and key-loop schedule of SWEEPS (``gluon``: the rows of GLUON_SWEEP), at
    the Wan-14B and CogVideoX shapes (``shortlist``: only GLUON_SHORTLIST's rows)."""
    from qvgen_kernels.attention_triton import AttentionConfig, attention_from_codes, quantize_qkv
    bench = _bench()
    res = out.setdefault("attention", {})
    shapes = TINY_SHAPES if tiny else SHAPES
    for index in ([0] if tiny else SWEEP_SHAPES):
        name, SQ, SK, H, D = shapes[index]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = (torch.randn(1, s, H, D, device=DEVICE, generator=gen).to(torch.bfloat16) for s in (SQ, SK, SK))
        o = torch.empty_like(q)
        ref = sdpa(q, k, v)
        sweep_res = []
        rows = (GLUON_SHORTLIST if shortlist else GLUON_SWEEP) if gluon else (TINY_SWEEPS if tiny else SWEEPS)[D]
        for cfg in (AttentionConfig(*t) for t in rows):
            try:
                qkv = quantize_qkv(q, k, v, config=cfg)
                ms = bench(lambda: attention_from_codes(qkv, o, cfg))
                sweep_res.append(dict(config=cfg.__dict__, kernel_ms=ms,
                                      cosine_vs_sdpa=cosine(attention_from_codes(qkv, o, cfg), ref)))
            except Exception as e:
                sweep_res.append(dict(config=cfg.__dict__, error=repr(e)[:300]))
        res[("sweep_gluon_" if gluon else "sweep_") + name] = sweep_res
        print("attention sweep", name, sweep_res, flush=True)
        save()
        q = k = v = ref = None


def fastest_gluon_config(out: dict, head_dim: int):
    """The quickest row of the Gluon sweep at ``head_dim`` in this run that kept cosine >= 0.999 against SDPA (None
    if none did), for the whole-model columns."""
    from qvgen_kernels.attention_triton import AttentionConfig
    dims = {name: D for name, _, _, _, D in SHAPES + TINY_SHAPES}
    rows = [r for key, sweep in out.get("attention", {}).items() if key.startswith("sweep_gluon_")
            and dims.get(key[len("sweep_gluon_"):]) == head_dim for r in sweep
            if "kernel_ms" in r and r.get("cosine_vs_sdpa", 0) >= 0.999]
    return AttentionConfig(**min(rows, key=lambda r: r["kernel_ms"])["config"]) if rows else None


def wan_preps(S: int, H: int, D: int):
    """QKPrep of Wan's q and k: RMSNorm across the heads (random weights) and random rotary tables."""
    from qvgen_kernels.attention import QKPrep
    gen = torch.Generator(device=DEVICE).manual_seed(S)
    angles = torch.rand(S, D // 2, device=DEVICE, generator=gen) * 6.3
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    return tuple(QKPrep("rms_row", 1 + 0.1 * torch.randn(H * D, device=DEVICE, generator=gen), cos=cos, sin=sin)
                 for _ in range(2))


def bench_sage_attention(out: dict, save):
    """``sageattn`` (K smoothing on, NHD layout) at every shape the attention section measured, same inputs (same
    seeds), against that section's SDPA time; cosine against SDPA. Its smoothing subtracts K's mean from K in
    place: the first call centres K and later ones subtract ~0, so the timed calls do the same work."""
    from sageattention import sageattn          # ImportError: the section records it
    from triton.testing import do_bench
    for name, row in out.get("attention", {}).items():
        if not (isinstance(row, dict) and "tokens" in row):
            continue
        SQ, SK, H, D = row["tokens"], row["kv_tokens"], row["heads"], row["head_dim"]
        gen = torch.Generator(device=DEVICE).manual_seed(SQ)
        q, k, v = (torch.randn(1, s, H, D, device=DEVICE, generator=gen).to(torch.bfloat16) for s in (SQ, SK, SK))
        try:
            ref = sdpa(q, k, v)
            row["sageattn_1_0_6_cosine_vs_sdpa"] = cosine(sageattn(q, k, v, tensor_layout="NHD"), ref)
            row["sageattn_1_0_6_ms"] = do_bench(lambda: sageattn(q, k, v, tensor_layout="NHD"), warmup=3, rep=100,
                                                return_mode="median")
            if row.get("sdpa_ms"):
                row["sageattn_1_0_6_speedup_vs_sdpa"] = row["sdpa_ms"] / row["sageattn_1_0_6_ms"]
        except Exception as e:
            row["sageattn_1_0_6_error"] = repr(e)[:400]
        print("attention sageattn", name, {k: v for k, v in row.items() if k.startswith("sageattn")}, flush=True)
        save()
        q = k = v = ref = None
