"""Triton kernel (a): per-token activation quantization, bit-identical to ``codes.act_*``.

Same float32 operations in the same order as ``codes.act_clip_range`` -> ``act_qparams`` -> ``act_codes``:
IEEE-exact divisions (:func:`divide_exact`; Triton's plain ``/`` is approximate), ties-to-even rounding,
and no contracted multiply-adds (compiled with ``enable_fp_fusion=False``), each sample's clip factors
picked by its timestep group. Also writes the per-token scale, zero point and row sum of codes for the GEMM
epilogue. A program walks its rows in [ROWS, BLOCK_K] chunks (only the last one masked) twice: min/max,
then codes (that second read hits L1/L2): memory-bound, 2 bytes in and 1 out per element.

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
from .triton_env import interpreter_requested

_TILE_ELEMENTS = 2048      # at most this many elements a program holds at once: ROWS x BLOCK_K
_ROW_BYTES = 16384         # at most this many input bytes of rows a program reads (twice)


@triton.jit
def round_half_even(v):
    """``torch.round`` (ties to even) with two float32 adds, exact for |v| < 2**22.

    Larger |v| are returned unrounded: every caller adds an integer in [0, 255] and clamps to
    [0, qmax], which maps them to 0 or qmax either way. (libdevice's rint does not run in the interpreter.)
    """
    magic = 12582912.0  # 1.5 * 2**23: v + magic lands where the float32 spacing is exactly 1
    return tl.where(tl.abs(v) < 4194304.0, (v + magic) - magic, v)


@triton.jit
def cast_rn(x, dtype: tl.constexpr, EXACT: tl.constexpr):
    """float32 -> ``dtype`` rounded to nearest even. Compiled casts round so; Triton 3.6's interpreter truncates
    float32 -> bfloat16, so there (EXACT) the 16 low bits are rounded off first."""
    if EXACT and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def divide_exact(x, s, r, FMA_DIV: tl.constexpr):
    """IEEE round-to-nearest ``x / s`` (what torch computes), ``s > 0`` with ``r = RN(1 / s)`` per row.

    Compiled: ``q = x * r`` then two Markstein corrections ``q += RN(x - s * q) * r`` with fused
    multiply-adds: the first makes q faithful, the second correctly rounded (Markstein's theorem: r is the
    correctly rounded reciprocal and the remainder is exact). Branch-free, three times cheaper than
    ``div_rn``, whose slow-path check serialises every element. Quotients of magnitude >= 2**22, whose codes
    saturate, are returned uncorrected (also keeps an overflowed x * r from turning into NaN).
    The interpreter has no fused multiply-add: there ``div_rn`` (exact in numpy) is used instead.
    """
    if FMA_DIV:
        q0 = x * r
        q = tl.fma(tl.fma(-s, q0, x), r, q0)
        q = tl.fma(tl.fma(-s, q, x), r, q)
        return tl.where(tl.abs(q0) < 4194304.0, q, q0)
    else:
        return tl.math.div_rn(x, s)


@triton.jit
def act_qparams(rmin, rmax, g, clip_lo_ptr, clip_hi_ptr, clip_ratio, qmax, inv_qmax, RECIPROCAL: tl.constexpr,
                FMA_DIV: tl.constexpr):
    """Per-row scale, its reciprocal and the zero point from the row min / max and the row's timestep group."""
    # codes.act_clip_range: lo = a_lo * (rowmin * c), hi = a_hi * (rowmax * c)
    lo = tl.load(clip_lo_ptr + g) * (rmin * clip_ratio)
    hi = tl.load(clip_hi_ptr + g) * (rmax * clip_ratio)
    # codes.act_qparams: s = max((hi - lo) / qmax, eps), z = clamp(-round(lo / s), 0, qmax)
    if RECIPROCAL:
        scale = (hi - lo) * inv_qmax
    else:
        scale = tl.math.div_rn(hi - lo, qmax)
    scale = tl.maximum(scale, 1e-9)
    recip = tl.math.div_rn(1.0, scale)
    zero = tl.minimum(tl.maximum(-round_half_even(divide_exact(lo, scale, recip, FMA_DIV)), 0.0), qmax)
    return scale, recip, zero


@triton.jit
def act_codes(x, s2, r2, z2, qmax, FMA_DIV: tl.constexpr):
    """codes.act_codes: q = clamp(round(x / s) + z, 0, qmax), as float and as int32."""
    q = tl.minimum(tl.maximum(round_half_even(divide_exact(x, s2, r2, FMA_DIV)) + z2, 0.0), qmax)
    # integer value of q in [0, 255] without a float-to-int conversion: the low mantissa bits of q + 2**23
    qi = (q + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    return q, qi


@triton.jit(do_not_specialize=["M", "rows_per_sample"])
def _act_quant_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, rowsum_ptr, group_ptr, clip_lo_ptr, clip_hi_ptr,
                      M, stride_xm, stride_cm, rows_per_sample, clip_ratio, qmax, inv_qmax,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, RECIPROCAL: tl.constexpr,
                      FMA_DIV: tl.constexpr, CODES_FP8: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    rows = tl.where(row_ok, rows, 0).to(tl.int64)          # rows past M re-read row 0 and store nothing
    offs = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm
    c_rows = codes_ptr + rows[:, None] * stride_cm

    # pass 1: row min / max (exact, order-free)
    vmin = tl.full([ROWS, BLOCK_K], float("inf"), tl.float32)
    vmax = tl.full([ROWS, BLOCK_K], float("-inf"), tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        if k0 + BLOCK_K <= K:          # compile-time: only the last chunk can be partial
            x = tl.load(x_rows + k0 + offs[None, :]).to(tl.float32)
            vmin = tl.minimum(vmin, x)
            vmax = tl.maximum(vmax, x)
        else:
            k_ok = (k0 + offs[None, :]) < K
            x = tl.load(x_rows + k0 + offs[None, :], mask=k_ok, other=0.0).to(tl.float32)
            vmin = tl.minimum(vmin, tl.where(k_ok, x, float("inf")))
            vmax = tl.maximum(vmax, tl.where(k_ok, x, float("-inf")))
    rmin = tl.min(vmin, axis=1)
    rmax = tl.max(vmax, axis=1)
    g = tl.load(group_ptr + rows // rows_per_sample)
    scale, recip, zero = act_qparams(rmin, rmax, g, clip_lo_ptr, clip_hi_ptr, clip_ratio, qmax, inv_qmax,
                                     RECIPROCAL, FMA_DIV)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    tl.store(zero_ptr + rows, zero, mask=row_ok)

    # pass 2 (the row is re-read from L1/L2): codes.act_codes, q = clamp(round(x / s) + z, 0, qmax)
    s2 = scale[:, None]
    r2 = recip[:, None]
    z2 = zero[:, None]
    acc = tl.zeros([ROWS, BLOCK_K], tl.int32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        if k0 + BLOCK_K <= K:
            k_ok = row_ok[:, None]
            x = tl.load(x_rows + k0 + offs[None, :]).to(tl.float32)
        else:
            k_ok = row_ok[:, None] & ((k0 + offs[None, :]) < K)
            x = tl.load(x_rows + k0 + offs[None, :], mask=k_ok, other=0.0).to(tl.float32)
        q, qi = act_codes(x, s2, r2, z2, qmax, FMA_DIV)
        if k0 + BLOCK_K <= K:
            acc += qi
        else:
            acc += tl.where(k_ok, qi, 0)
        if CODES_FP8:
            tl.store(c_rows + k0 + offs[None, :], q.to(tl.float8e4nv), mask=k_ok)
        else:
            tl.store(c_rows + k0 + offs[None, :], qi.to(tl.int8), mask=k_ok)
    tl.store(rowsum_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


def tile_shape(K: int):
    """(BLOCK_K, ROWS, num_warps) of a program's [ROWS, BLOCK_K] tile.

    BLOCK_K: the largest of 1024 / 512 / 256 / 128 whose padding of the last chunk wastes at most 7% of K.
    ROWS: rows per program such that a program's rows stay under 16 KB of bf16 (so that the second pass
    over them hits L1/L2; measured: 110 KB programs at K = 13824 re-read from DRAM, 63% of the bandwidth
    floor against 85% at K = 5120). num_warps: about 8 elements (one 16-byte load) a thread.
    """
    block = 128
    for candidate in (1024, 512, 256):
        if candidate <= max(128, triton.next_power_of_2(K)) and (-K % candidate) <= 0.07 * K:
            block = candidate
            break
    padded = triton.cdiv(K, block) * block
    rows = 1
    while rows * 2 * padded * 2 <= _ROW_BYTES and rows * 2 * block <= _TILE_ELEMENTS:
        rows *= 2
    warps = max(1, min(8, rows * block // 256))
    return block, rows, warps


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
    block_k, rows, warps = tile_shape(K)
    _act_quant_kernel[(triton.cdiv(M, rows),)](
        x, out_codes, scale, zero, rowsum,
        groups.to(device=device).contiguous(),
        clip_lower.to(device=device, dtype=torch.float32).contiguous(),
        clip_upper.to(device=device, dtype=torch.float32).contiguous(),
        M, x.stride(0), out_codes.stride(0), rows_per_sample,
        float(np.float32(clip_ratio)), float(top), float(np.float32(1) / np.float32(top)),
        K=K, BLOCK_K=block_k, ROWS=rows, RECIPROCAL=scalar_division_uses_reciprocal(device.type),
        FMA_DIV=not interpreter_requested(), CODES_FP8=codes_dtype == torch.float8_e4m3fn, num_warps=warps,
        enable_fp_fusion=False)
    return QuantizedActivations(out_codes, scale, zero, rowsum, bits)
