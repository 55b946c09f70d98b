"""Triton kernel (a): per-token activation quantization, bit-identical to ``codes.act_*``.

Same float32 operations in the same order as ``codes.act_clip_range`` -> ``act_qparams`` -> ``act_codes``:
IEEE divisions (``div_rn``; Triton's plain ``/`` is approximate), ties-to-even rounding, and no fused
multiply-adds (the kernel is compiled with ``enable_fp_fusion=False``), each sample's clip factors picked
by its timestep group. Also writes the per-token scale, zero point and row sum of codes for the GEMM
epilogue. One program per token row; memory-bound (reads the row, writes one byte a code).

The feature count is a compile-time constant: loops with run-time bounds do not run in Triton 3.6's
interpreter under numpy >= 2.4 (triton-lang/triton#9171), and a model has only a few distinct widths.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import codes
from .act_quant import QuantizedActivations, check_groups, scalar_division_uses_reciprocal

_MAX_SINGLE_PASS = 8192   # a row up to this many features stays in registers between the two passes
_CHUNK = 4096


@triton.jit
def round_half_even(v):
    """``torch.round`` (ties to even) with two float32 adds, exact for |v| < 2**22.

    Larger |v| are returned unrounded: every caller adds an integer in [0, 255] and clamps to
    [0, qmax], which maps them to 0 or qmax either way. (libdevice's rint does not run in the interpreter.)
    """
    magic = 12582912.0  # 1.5 * 2**23: v + magic lands where the float32 spacing is exactly 1
    return tl.where(tl.abs(v) < 4194304.0, (v + magic) - magic, v)


@triton.jit
def _quantize_chunk(x, scale, zero, qmax):
    return tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x, scale)) + zero, 0.0), qmax)


@triton.jit(do_not_specialize=["rows_per_sample"])
def _act_quant_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, rowsum_ptr, group_ptr, clip_lo_ptr, clip_hi_ptr,
                      stride_xm, stride_cm, rows_per_sample, clip_ratio, qmax, inv_qmax,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr, RECIPROCAL: tl.constexpr,
                      CODES_FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    c_row = codes_ptr + row * stride_cm
    offs = tl.arange(0, BLOCK_K)

    if SINGLE_PASS:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        rmin = tl.min(tl.where(mask, x, float("inf")), axis=0)
        rmax = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    else:
        vmin = tl.full([BLOCK_K], float("inf"), tl.float32)
        vmax = tl.full([BLOCK_K], float("-inf"), tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            mask = (k0 + offs) < K
            xc = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            vmin = tl.minimum(vmin, tl.where(mask, xc, float("inf")))
            vmax = tl.maximum(vmax, tl.where(mask, xc, float("-inf")))
        rmin = tl.min(vmin, axis=0)
        rmax = tl.max(vmax, axis=0)

    # codes.act_clip_range: lo = a_lo * (rowmin * c), hi = a_hi * (rowmax * c)
    g = tl.load(group_ptr + row // rows_per_sample)
    lo = tl.load(clip_lo_ptr + g) * (rmin * clip_ratio)
    hi = tl.load(clip_hi_ptr + g) * (rmax * clip_ratio)
    # codes.act_qparams: s = max((hi - lo) / qmax, eps), z = clamp(-round(lo / s), 0, qmax)
    if RECIPROCAL:
        scale = (hi - lo) * inv_qmax
    else:
        scale = tl.math.div_rn(hi - lo, qmax)
    scale = tl.maximum(scale, 1e-9)
    zero = tl.minimum(tl.maximum(-round_half_even(tl.math.div_rn(lo, scale)), 0.0), qmax)
    tl.store(scale_ptr + row, scale)
    tl.store(zero_ptr + row, zero)

    # codes.act_codes: q = clamp(round(x / s) + z, 0, qmax)
    if SINGLE_PASS:
        q = _quantize_chunk(x, scale, zero, qmax)
        total = tl.sum(tl.where(mask, q.to(tl.int32), 0), axis=0)
        if CODES_FP8:
            tl.store(c_row + offs, q.to(tl.float8e4nv), mask=mask)
        else:
            tl.store(c_row + offs, q.to(tl.int8), mask=mask)
    else:
        acc = tl.zeros([BLOCK_K], tl.int32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            mask = (k0 + offs) < K
            xc = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            q = _quantize_chunk(xc, scale, zero, qmax)
            acc += tl.where(mask, q.to(tl.int32), 0)
            if CODES_FP8:
                tl.store(c_row + k0 + offs, q.to(tl.float8e4nv), mask=mask)
            else:
                tl.store(c_row + k0 + offs, q.to(tl.int8), mask=mask)
        total = tl.sum(acc, axis=0)
    tl.store(rowsum_ptr + row, total)


def quantize_per_token_triton(x: torch.Tensor, groups: torch.Tensor, rows_per_sample: int, clip_lower: torch.Tensor,
                              clip_upper: torch.Tensor, clip_ratio: float, bits: int,
                              codes_dtype: torch.dtype = torch.int8) -> QuantizedActivations:
    """Triton twin of :func:`act_quant.quantize_per_token_torch` on a [M, K] input (rows contiguous).

    ``codes_dtype``: int8 (for the int8 GEMM) or ``torch.float8_e4m3fn`` (codes up to 15 are exact in it).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected a [tokens, features] input with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    top = codes.qmax(bits)
    if codes_dtype == torch.int8 and bits > 7:
        raise ValueError(f"{bits}-bit activation codes do not fit int8; use the torch path")
    if codes_dtype == torch.float8_e4m3fn and bits > 4:
        raise ValueError(f"{bits}-bit activation codes are not exact in float8 e4m3")
    if codes_dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"codes_dtype must be int8 or float8_e4m3fn, got {codes_dtype}")
    M, K = x.shape
    check_groups(groups, M, rows_per_sample)
    device = x.device
    out_codes = torch.empty((M, K), dtype=codes_dtype, device=device)
    scale = torch.empty(M, dtype=torch.float32, device=device)
    zero = torch.empty(M, dtype=torch.float32, device=device)
    rowsum = torch.empty(M, dtype=torch.int32, device=device)
    if M == 0:
        return QuantizedActivations(out_codes, scale, zero, rowsum, bits)
    single = triton.next_power_of_2(K) <= _MAX_SINGLE_PASS
    block_k = triton.next_power_of_2(K) if single else _CHUNK
    num_warps = 4 if block_k <= 2048 else 8
    _act_quant_kernel[(M,)](
        x, out_codes, scale, zero, rowsum,
        groups.to(device=device, dtype=torch.int32).contiguous(),
        clip_lower.to(device=device, dtype=torch.float32).contiguous(),
        clip_upper.to(device=device, dtype=torch.float32).contiguous(),
        x.stride(0), out_codes.stride(0), rows_per_sample,
        float(np.float32(clip_ratio)), float(top), float(np.float32(1) / np.float32(top)),
        K=K, BLOCK_K=block_k, SINGLE_PASS=single, RECIPROCAL=scalar_division_uses_reciprocal(device.type),
        CODES_FP8=codes_dtype == torch.float8_e4m3fn, num_warps=num_warps, enable_fp_fusion=False)
    return QuantizedActivations(out_codes, scale, zero, rowsum, bits)
