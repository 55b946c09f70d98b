"""Triton kernels of the fused per-token activation fake quantiser (forward and backward).

The forward computes exactly what ``fake_quant.fake_quant_activation_reference`` computes: the float32
operations of ``qvgen_kernels.codes`` in the same order (IEEE divisions, ties-to-even rounding, no fused
multiply-adds: launched with ``enable_fp_fusion=False``), so its output is bit-identical. The backward
is the reference autograd graph written out by hand: the straight-through gradient into ``x``, the
LSQ-style gradient of the per-row scale, which reaches the clip factors and, through the row min/max,
the extreme elements of the row (ties share it evenly, like ``torch.amax``).

Inputs are [rows, N] with contiguous rows. N is a compile-time constant: loops with run-time bounds do
not run in Triton 3.6's interpreter under numpy >= 2.4, and a model has few distinct widths.
Each program owns BLOCK_M rows and walks them in BLOCK_N chunks; a second walk over the same rows (the
forward's quantisation after the range, the backward's dx after the row sums) mostly hits L2.
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron_qvgen.quant.fused_store import store_rounded
from qvgen_kernels.act_quant_triton import round_half_even


@triton.jit
def _row_range(x_ptr, base, row_mask, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """min and max of each row (the ``torch.amin``/``amax`` of ``codes.act_clip_range``)."""
    cols = tl.arange(0, BLOCK_N)
    vmin = tl.full([BLOCK_M, BLOCK_N], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    for k0 in range(0, N, BLOCK_N):
        mask = row_mask[:, None] & ((k0 + cols) < N)[None, :]
        x = tl.load(x_ptr + base + k0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        vmin = tl.minimum(vmin, tl.where(mask, x, float("inf")))
        vmax = tl.maximum(vmax, tl.where(mask, x, float("-inf")))
    rmin = tl.where(row_mask, tl.min(vmin, axis=1), 0.0)
    rmax = tl.where(row_mask, tl.max(vmax, axis=1), 0.0)
    return rmin, rmax


@triton.jit
def _row_qparams(rmin, rmax, a_lo, a_hi, clip_ratio, qmax, inv_qmax, eps, RECIPROCAL: tl.constexpr):
    """``codes.act_clip_range`` + ``codes.act_qparams`` per row: the unclamped scale, the scale, the zero point.

    RECIPROCAL: torch divides a tensor by the Python int qmax as a product with its float32 reciprocal on
    CUDA and as a true division on CPU; mirror whichever the reference runs."""
    lo = a_lo * (rmin * clip_ratio)
    hi = a_hi * (rmax * clip_ratio)
    if RECIPROCAL:
        raw = (hi - lo) * inv_qmax
    else:
        raw = tl.math.div_rn(hi - lo, qmax)
    scale = tl.maximum(raw, eps)
    zero = tl.minimum(tl.maximum(-round_half_even(tl.math.div_rn(lo, scale)), 0.0), qmax)
    return raw, scale, zero


@triton.jit
def _load_row_params(rmin_ptr, rmax_ptr, alo_ptr, ahi_ptr, rows, row_mask):
    rmin = tl.load(rmin_ptr + rows, mask=row_mask, other=0.0)
    rmax = tl.load(rmax_ptr + rows, mask=row_mask, other=0.0)
    a_lo = tl.load(alo_ptr + rows, mask=row_mask, other=1.0)
    a_hi = tl.load(ahi_ptr + rows, mask=row_mask, other=1.0)
    return rmin, rmax, a_lo, a_hi


@triton.jit
def _row_block(n_rows, N: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    return rows, row_mask, rows[:, None] * N


@triton.jit
def row_range_kernel(x_ptr, rmin_ptr, rmax_ptr, n_rows,
                     N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Local row ranges of a row split over tensor-parallel ranks (all-reduced by the caller)."""
    rows, row_mask, base = _row_block(n_rows, N, BLOCK_M)
    rmin, rmax = _row_range(x_ptr, base, row_mask, N, BLOCK_M, BLOCK_N)
    tl.store(rmin_ptr + rows, rmin, mask=row_mask)
    tl.store(rmax_ptr + rows, rmax, mask=row_mask)


@triton.jit
def act_fake_quant_fwd_kernel(x_ptr, out_ptr, rmin_ptr, rmax_ptr, alo_ptr, ahi_ptr, n_rows,
                              clip_ratio, qmax, inv_qmax, eps,
                              N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              RANGE_GIVEN: tl.constexpr, RECIPROCAL: tl.constexpr):
    """``x_hat = s * (clamp(round(x / s) + z, 0, qmax) - z)`` in x's dtype.

    RANGE_GIVEN: the row min/max were reduced over a TP group and are read; otherwise computed here and
    written (the backward needs them)."""
    rows, row_mask, base = _row_block(n_rows, N, BLOCK_M)
    if RANGE_GIVEN:
        rmin = tl.load(rmin_ptr + rows, mask=row_mask, other=0.0)
        rmax = tl.load(rmax_ptr + rows, mask=row_mask, other=0.0)
    else:
        rmin, rmax = _row_range(x_ptr, base, row_mask, N, BLOCK_M, BLOCK_N)
        tl.store(rmin_ptr + rows, rmin, mask=row_mask)
        tl.store(rmax_ptr + rows, rmax, mask=row_mask)
    a_lo = tl.load(alo_ptr + rows, mask=row_mask, other=1.0)
    a_hi = tl.load(ahi_ptr + rows, mask=row_mask, other=1.0)
    _, scale, zero = _row_qparams(rmin, rmax, a_lo, a_hi, clip_ratio, qmax, inv_qmax, eps, RECIPROCAL)
    s = scale[:, None]
    z = zero[:, None]
    cols = tl.arange(0, BLOCK_N)
    for k0 in range(0, N, BLOCK_N):
        mask = row_mask[:, None] & ((k0 + cols) < N)[None, :]
        offs = base + k0 + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x, s)) + z, 0.0), qmax)
        store_rounded(out_ptr, offs, s * (q - z), mask)


@triton.jit
def _scale_grad_sums(x_ptr, g_ptr, base, row_mask, rmin, rmax, scale, zero, qmax,
                     N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per row: d loss / d scale (both uses of s: the division x / s and the product s * (q - z)) and
    how many elements tie with the row max and min."""
    s = scale[:, None]
    z = zero[:, None]
    inv_s = tl.math.div_rn(1.0, scale)[:, None]   # gradient-only quotient: a product is rounding-close and cheaper
    cols = tl.arange(0, BLOCK_N)
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_max = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_min = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, N, BLOCK_N):
        mask = row_mask[:, None] & ((k0 + cols) < N)[None, :]
        offs = base + k0 + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, s)
        t = round_half_even(v) + z
        q = tl.minimum(tl.maximum(t, 0.0), qmax)
        dv = tl.where((t >= 0.0) & (t <= qmax), g * s, 0.0)
        # MulBackward (s * (q - z)) and DivBackward (x / s: -grad * ((x / s) / s)) of the reference graph
        acc_s += g * (q - z) + (-dv) * (v * inv_s)
        acc_max += tl.where(mask & (x == rmax[:, None]), 1.0, 0.0)
        acc_min += tl.where(mask & (x == rmin[:, None]), 1.0, 0.0)
    return tl.sum(acc_s, axis=1), tl.sum(acc_max, axis=1), tl.sum(acc_min, axis=1)


@triton.jit
def _range_grads(gs, raw, rmin, rmax, a_lo, a_hi, clip_ratio, qmax, inv_qmax, eps, RECIPROCAL: tl.constexpr):
    """From d/d scale to the clip factors and the row extremes (clamp_min, / qmax, lo and hi products)."""
    graw = tl.where(raw >= eps, gs, 0.0)
    if RECIPROCAL:
        g_hi = graw * inv_qmax
    else:
        g_hi = tl.math.div_rn(graw, qmax)
    g_lo = -g_hi
    g_ahi = g_hi * (rmax * clip_ratio)
    g_alo = g_lo * (rmin * clip_ratio)
    g_rmax = (g_hi * a_hi) * clip_ratio
    g_rmin = (g_lo * a_lo) * clip_ratio
    return g_alo, g_ahi, g_rmin, g_rmax


@triton.jit
def _write_dx(x_ptr, g_ptr, dx_ptr, base, row_mask, scale, zero, rmin, rmax, share_min, share_max, qmax,
              N: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = straight-through gradient + each row extreme's share of its row's gradient."""
    s = scale[:, None]
    z = zero[:, None]
    cols = tl.arange(0, BLOCK_N)
    for k0 in range(0, N, BLOCK_N):
        mask = row_mask[:, None] & ((k0 + cols) < N)[None, :]
        offs = base + k0 + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = round_half_even(tl.math.div_rn(x, s)) + z
        dv = tl.where((t >= 0.0) & (t <= qmax), g * s, 0.0)
        dx = tl.math.div_rn(dv, s)
        dx += tl.where(x == rmax[:, None], share_max[:, None], 0.0)
        dx += tl.where(x == rmin[:, None], share_min[:, None], 0.0)
        store_rounded(dx_ptr, offs, dx, mask)


@triton.jit
def act_fake_quant_bwd_kernel(x_ptr, g_ptr, dx_ptr, rmin_ptr, rmax_ptr, alo_ptr, ahi_ptr, galo_ptr, gahi_ptr,
                              ext_ptr, n_rows, clip_ratio, qmax, inv_qmax, eps,
                              N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              PHASE: tl.constexpr, RECIPROCAL: tl.constexpr):
    """Backward of the activation fake quantiser.

    PHASE 0 (whole row on this rank): row sums, then dx, in one program.
    PHASE 1 (row split over TP ranks): row sums only; writes the clip factors' gradients and, to ``ext``
    [4, rows], the local gradients of the row max/min and the local tie counts, which the caller sums
    over the group (what tp_reduce's backward all-reduces).
    PHASE 2: dx from the summed ``ext``."""
    rows, row_mask, base = _row_block(n_rows, N, BLOCK_M)
    rmin, rmax, a_lo, a_hi = _load_row_params(rmin_ptr, rmax_ptr, alo_ptr, ahi_ptr, rows, row_mask)
    raw, scale, zero = _row_qparams(rmin, rmax, a_lo, a_hi, clip_ratio, qmax, inv_qmax, eps, RECIPROCAL)
    if PHASE == 2:
        g_rmax = tl.load(ext_ptr + rows, mask=row_mask, other=0.0)
        g_rmin = tl.load(ext_ptr + n_rows + rows, mask=row_mask, other=0.0)
        n_max = tl.load(ext_ptr + 2 * n_rows + rows, mask=row_mask, other=1.0)
        n_min = tl.load(ext_ptr + 3 * n_rows + rows, mask=row_mask, other=1.0)
    else:
        gs, n_max, n_min = _scale_grad_sums(x_ptr, g_ptr, base, row_mask, rmin, rmax, scale, zero, qmax,
                                            N, BLOCK_M, BLOCK_N)
        g_alo, g_ahi, g_rmin, g_rmax = _range_grads(gs, raw, rmin, rmax, a_lo, a_hi, clip_ratio, qmax, inv_qmax,
                                                    eps, RECIPROCAL)
        tl.store(galo_ptr + rows, g_alo, mask=row_mask)
        tl.store(gahi_ptr + rows, g_ahi, mask=row_mask)
        if PHASE == 1:
            tl.store(ext_ptr + rows, g_rmax, mask=row_mask)
            tl.store(ext_ptr + n_rows + rows, g_rmin, mask=row_mask)
            tl.store(ext_ptr + 2 * n_rows + rows, n_max, mask=row_mask)
            tl.store(ext_ptr + 3 * n_rows + rows, n_min, mask=row_mask)
    if PHASE != 1:
        n_max = tl.where(row_mask, n_max, 1.0)
        n_min = tl.where(row_mask, n_min, 1.0)
        # torch.amax/amin backward: (grad / count) on each tied element
        share_max = tl.math.div_rn(g_rmax, n_max)
        share_min = tl.math.div_rn(g_rmin, n_min)
        _write_dx(x_ptr, g_ptr, dx_ptr, base, row_mask, scale, zero, rmin, rmax, share_min, share_max, qmax,
                  N, BLOCK_N)


def act_block_sizes(n_cols: int):
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n_cols`` elements.

    BLOCK_N divides the row when a power of two in [512, 2048] does (5120, 13824, 1536): no masked tail.
    BLOCK_M keeps a program's rows within ~8K elements, so that the second walk over them still finds them
    in L2 with every SM's programs in flight. About 8 elements (16 bytes of bf16) per thread and step."""
    block_n = 2048
    while block_n > 512 and n_cols % block_n:
        block_n //= 2
    if n_cols % block_n:
        block_n = min(triton.next_power_of_2(n_cols), 2048)
    block_m = 1
    while block_m < 8 and 2 * block_m * n_cols <= 8192:
        block_m *= 2
    num_warps = max(1, min(8, block_m * block_n // 256))
    return block_m, block_n, num_warps
