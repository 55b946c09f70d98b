"""Triton kernel: LayerNorm (+ affine) (+ modulation) and the per-token codes of up to three consumers, one pass.

A program holds ROWS rows (at most 16 KB of bf16, so that the passes after the first hit L1/L2, as in
``act_quant_triton``) and walks them in BLOCK_K chunks four times: the mean, the variance (two-pass, as robust as
torch's Welford), ``h`` rounded to the activation dtype for its min / max, and ``h`` again for each consumer's codes
(``act_quant_triton.act_qparams`` / ``act_codes``: the same float32 operations as ``codes.act_*``). Built without
contracted multiply-adds so that the modulation rounds as torch's separate multiply and add do.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import codes
from .act_quant import QuantizedActivations, check_groups, scalar_division_uses_reciprocal
from .act_quant_triton import act_codes, act_qparams, cast_rn, tile_shape
from .norm_quant import ClipTarget, NormSpec
from .triton_env import interpreter_requested

MAX_TARGETS = 3


@triton.jit
def _h(x, mean, rstd, k, sample, w_ptr, b_ptr, shift_ptr, mscale_ptr, K: tl.constexpr, AFFINE: tl.constexpr,
       MODULATE: tl.constexpr, ROUND_BF16: tl.constexpr, EXACT_CAST: tl.constexpr):
    k_ok = k < K
    h = (x - mean[:, None]) * rstd[:, None]
    if AFFINE:
        h = h * tl.load(w_ptr + k, mask=k_ok, other=0.0).to(tl.float32) + \
            tl.load(b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    if MODULATE:
        at = sample[:, None] * K + k
        h = h * (1.0 + tl.load(mscale_ptr + at, mask=k_ok, other=0.0)) + tl.load(shift_ptr + at, mask=k_ok, other=0.0)
    if ROUND_BF16:
        h = cast_rn(h, tl.bfloat16, EXACT_CAST).to(tl.float32)
    return h


@triton.jit
def _emit(h, rows, mask, k, c_ptr, stride_c, scale, recip, zero, acc, qmax, FMA_DIV: tl.constexpr):
    q, qi = act_codes(h, scale[:, None], recip[:, None], zero[:, None], qmax, FMA_DIV)
    tl.store(c_ptr + rows[:, None] * stride_c + k, qi.to(tl.int8), mask=mask)
    return acc + tl.where(mask, qi, 0)


@triton.jit(do_not_specialize=["M", "rows_per_sample"])
def _norm_quant_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, mscale_ptr, h_ptr, group_ptr,
                       c0, s0, z0, r0, lo0, hi0, c1, s1, z1, r1, lo1, hi1, c2, s2, z2, r2, lo2, hi2,
                       M, stride_xm, rows_per_sample, eps, clip_ratio, qmax, inv_qmax,
                       K: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, AFFINE: tl.constexpr,
                       MODULATE: tl.constexpr, NOUT: tl.constexpr, STORE_H: tl.constexpr, ROUND_BF16: tl.constexpr,
                       RECIPROCAL: tl.constexpr, FMA_DIV: tl.constexpr, EXACT_CAST: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    rows = tl.where(row_ok, rows, 0).to(tl.int64)
    sample = rows // rows_per_sample
    offs = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm

    acc = tl.zeros([ROWS, BLOCK_K], tl.float32)                     # pass 1: mean
    for k0 in tl.static_range(0, K, BLOCK_K):
        k = k0 + offs[None, :]
        acc += tl.load(x_rows + k, mask=k < K, other=0.0).to(tl.float32)
    mean = tl.sum(acc, 1) / K
    acc = tl.zeros([ROWS, BLOCK_K], tl.float32)                     # pass 2: variance about the mean
    for k0 in tl.static_range(0, K, BLOCK_K):
        k = k0 + offs[None, :]
        d = tl.where(k < K, tl.load(x_rows + k, mask=k < K, other=0.0).to(tl.float32) - mean[:, None], 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, 1) / K + eps)

    vmin = tl.full([ROWS, BLOCK_K], float("inf"), tl.float32)      # pass 3: h, its row min / max
    vmax = tl.full([ROWS, BLOCK_K], float("-inf"), tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        k = k0 + offs[None, :]
        h = _h(tl.load(x_rows + k, mask=k < K, other=0.0).to(tl.float32), mean, rstd, k, sample, w_ptr, b_ptr,
               shift_ptr, mscale_ptr, K, AFFINE, MODULATE, ROUND_BF16, EXACT_CAST)
        vmin = tl.minimum(vmin, tl.where(k < K, h, float("inf")))
        vmax = tl.maximum(vmax, tl.where(k < K, h, float("-inf")))
        if STORE_H:
            tl.store(h_ptr + rows[:, None] * K + k, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (k < K))
    rmin = tl.min(vmin, 1)
    rmax = tl.max(vmax, 1)
    g = tl.load(group_ptr + sample)
    sc0, rc0, zr0 = act_qparams(rmin, rmax, g, lo0, hi0, clip_ratio, qmax, inv_qmax, RECIPROCAL, FMA_DIV)
    tl.store(s0 + rows, sc0, mask=row_ok)
    tl.store(z0 + rows, zr0, mask=row_ok)
    sum0 = tl.zeros([ROWS, BLOCK_K], tl.int32)
    sc1, rc1, zr1 = sc0, rc0, zr0
    sc2, rc2, zr2 = sc0, rc0, zr0
    sum1 = sum0
    sum2 = sum0
    if NOUT > 1:
        sc1, rc1, zr1 = act_qparams(rmin, rmax, g, lo1, hi1, clip_ratio, qmax, inv_qmax, RECIPROCAL, FMA_DIV)
        tl.store(s1 + rows, sc1, mask=row_ok)
        tl.store(z1 + rows, zr1, mask=row_ok)
    if NOUT > 2:
        sc2, rc2, zr2 = act_qparams(rmin, rmax, g, lo2, hi2, clip_ratio, qmax, inv_qmax, RECIPROCAL, FMA_DIV)
        tl.store(s2 + rows, sc2, mask=row_ok)
        tl.store(z2 + rows, zr2, mask=row_ok)

    for k0 in tl.static_range(0, K, BLOCK_K):                      # pass 4: codes of every consumer
        k = k0 + offs[None, :]
        mask = row_ok[:, None] & (k < K)
        h = _h(tl.load(x_rows + k, mask=k < K, other=0.0).to(tl.float32), mean, rstd, k, sample, w_ptr, b_ptr,
               shift_ptr, mscale_ptr, K, AFFINE, MODULATE, ROUND_BF16, EXACT_CAST)
        sum0 = _emit(h, rows, mask, k, c0, K, sc0, rc0, zr0, sum0, qmax, FMA_DIV)
        if NOUT > 1:
            sum1 = _emit(h, rows, mask, k, c1, K, sc1, rc1, zr1, sum1, qmax, FMA_DIV)
        if NOUT > 2:
            sum2 = _emit(h, rows, mask, k, c2, K, sc2, rc2, zr2, sum2, qmax, FMA_DIV)
    tl.store(r0 + rows, tl.sum(sum0, 1), mask=row_ok)
    if NOUT > 1:
        tl.store(r1 + rows, tl.sum(sum1, 1), mask=row_ok)
    if NOUT > 2:
        tl.store(r2 + rows, tl.sum(sum2, 1), mask=row_ok)


def norm_quantize_triton(x: torch.Tensor, spec: NormSpec, targets: Sequence[ClipTarget], groups: torch.Tensor,
                         rows_per_sample: int, h_out: torch.Tensor | None = None) -> List[QuantizedActivations]:
    """Codes of ``norm_quant.norm_modulate_torch(x, spec)`` for each target, from x [M, K] (contiguous rows).

    ``h_out`` (optional, [M, K] in x's dtype) receives the normalized, modulated activation (for tests).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected [tokens, features] with contiguous rows, got {tuple(x.shape)} {x.stride()}")
    if not 1 <= len(targets) <= MAX_TARGETS:
        raise ValueError(f"between 1 and {MAX_TARGETS} consumers share one normalized activation, got {len(targets)}")
    bits, ratio = targets[0].bits, float(np.float32(targets[0].clip_ratio))
    if any(t.bits != bits or float(np.float32(t.clip_ratio)) != ratio for t in targets):
        raise ValueError("the consumers of one normalized activation must share bit width and clip ratio")
    if bits > 7:
        raise ValueError(f"{bits}-bit activation codes do not fit int8; use the torch path")
    M, K = x.shape
    check_groups(groups, M, rows_per_sample)
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the fused norm rounds h to bfloat16 or keeps float32, got {x.dtype}")
    device = x.device
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    outs = [QuantizedActivations(torch.empty(M, K, dtype=torch.int8, device=device),
                                 torch.empty(M, dtype=torch.float32, device=device),
                                 torch.empty(M, dtype=torch.float32, device=device),
                                 torch.empty(M, dtype=torch.int32, device=device), bits) for _ in targets]
    args = []
    for i in range(MAX_TARGETS):      # unused slots repeat the last consumer (never touched: NOUT)
        o, t = outs[min(i, len(outs) - 1)], targets[min(i, len(targets) - 1)]
        args += [o.codes, o.scale, o.zero, o.rowsum, t.clip_lower.to(device, torch.float32).contiguous(),
                 t.clip_upper.to(device, torch.float32).contiguous()]
    if M == 0:
        return outs
    if h_out is not None and (h_out.shape != (M, K) or not h_out.is_contiguous()):
        raise ValueError(f"h_out must be a contiguous [{M}, {K}] tensor")
    for name in ("weight", "bias"):
        t = getattr(spec, name)
        if t is not None and t.numel() != K:
            raise ValueError(f"the norm's {name} has {t.numel()} elements, the rows {K}")
    for name in ("shift", "scale"):
        t = getattr(spec, name)
        if t is not None and tuple(t.shape) != (M // rows_per_sample, K):
            raise ValueError(f"the modulation {name} must be [{M // rows_per_sample}, {K}], got {list(t.shape)}")
    top = codes.qmax(bits)
    block_k, rows, warps = tile_shape(K)
    _norm_quant_kernel[(triton.cdiv(M, rows),)](
        x, spec.weight if spec.weight is not None else dummy, spec.bias if spec.bias is not None else dummy,
        spec.shift.contiguous() if spec.shift is not None else dummy,
        spec.scale.contiguous() if spec.scale is not None else dummy,
        h_out if h_out is not None else dummy, groups.to(device).contiguous(), *args,
        M, x.stride(0), rows_per_sample, float(spec.eps), ratio, float(top), float(np.float32(1) / np.float32(top)),
        K=K, BLOCK_K=block_k, ROWS=rows, AFFINE=spec.weight is not None, MODULATE=spec.scale is not None,
        NOUT=len(targets), STORE_H=h_out is not None, ROUND_BF16=x.dtype == torch.bfloat16,
        RECIPROCAL=scalar_division_uses_reciprocal(device.type), FMA_DIV=not interpreter_requested(),
        EXACT_CAST=interpreter_requested(), num_warps=warps, enable_fp_fusion=False)
    return outs
