"""Triton kernels of the fused per-token activation fake quantiser (forward and backward).

The forward computes exactly what ``fake_quant.fake_quant_activation_reference`` computes: the float32
operations of ``qvgen_kernels.codes`` in the same order (IEEE-exact divisions, ties-to-even rounding, no
contracted multiply-adds: launched with ``enable_fp_fusion=False``), so its output is bit-identical. The
backward is the reference autograd graph written out by hand: the straight-through gradient into ``x``,
the LSQ-style gradient of the per-row scale, which reaches the clip factors and, through the row min/max,
the extreme elements of the row (ties share it evenly, like ``torch.amax``).

Memory traffic is the floor of each direction: the forward reads x twice (range, then codes; the second
read mostly hits L1/L2) and writes x_hat; the backward reads x and the output gradient ONCE, writing the
straight-through dx as it goes while it sums the row's scale gradient, then overwrites only the row's
max and min elements with their share (their index is found in the same pass). Rows with ties in their
max or min (rare: constant rows, saturated activations) take a second pass that rewrites the row.

Inputs are [rows, N] with contiguous rows. N is a compile-time constant: loops with run-time bounds do
not run in Triton 3.6's interpreter under numpy >= 2.4, and a model has few distinct widths. Block sizes
are autotuned per N on the GPU (first call of each width), fixed in the interpreter.
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron_qvgen.quant.fused_store import autotune_configs, store_rounded
from qvgen_kernels.act_quant_triton import divide_exact, round_half_even

# (BLOCK_M rows, BLOCK_N columns, warps) tried on the GPU: small programs, many in flight (see
# benchmarks/qat_linear/RESULTS.md); the interpreter runs one fixed config.
_FWD_CONFIGS = [(1, 512, 2), (1, 1024, 4), (2, 512, 4), (1, 2048, 8)]
_BWD_CONFIGS = [(1, 512, 2), (1, 1024, 4), (1, 256, 1), (2, 512, 4)]
_INTERPRETER_CONFIG = (2, 1024, 4)


def _autotune_configs(specs):
    return autotune_configs(specs, _INTERPRETER_CONFIG)


def _prune_wide(configs, named_args, **kwargs):
    """Drop chunks wider than the row (they only add idle lanes)."""
    n = kwargs["N"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= triton.next_power_of_2(n)]
    return kept or configs[:1]


_TUNE = dict(prune_configs_by={"early_config_prune": _prune_wide}, warmup=10, rep=40)


@triton.jit
def _row_block(n_rows, N: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's rows; rows past the end re-read the last row (loads need no mask) and store nothing."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, n_rows - 1)
    return rows, row_ok, rows[:, None] * N


@triton.jit
def _chunk(base, row_ok, k0, N: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr):
    """Offsets, columns, column mask and store mask of one [BLOCK_M, BLOCK_N] chunk. EVEN (BLOCK_N divides
    N): the store mask is constant along the row, so stores stay 16-byte vectors."""
    cols = k0 + tl.arange(0, BLOCK_N)
    col_ok = (cols < N)[None, :]
    if EVEN:
        store_ok = row_ok[:, None]
    else:
        store_ok = row_ok[:, None] & col_ok
    return base + cols[None, :], cols, col_ok, store_ok


@triton.jit
def _load_chunk(ptr, offs, col_ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr + offs).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _row_range(x_ptr, base, row_ok, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               EVEN: tl.constexpr):
    """min and max of each row (the ``torch.amin``/``amax`` of ``codes.act_clip_range``)."""
    vmin = tl.full([BLOCK_M, BLOCK_N], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    for k0 in range(0, N, BLOCK_N):
        offs, cols, col_ok, store_ok = _chunk(base, row_ok, k0, N, BLOCK_N, EVEN)
        x = _load_chunk(x_ptr, offs, col_ok, EVEN)
        if EVEN:
            vmin = tl.minimum(vmin, x)
            vmax = tl.maximum(vmax, x)
        else:
            vmin = tl.minimum(vmin, tl.where(col_ok, x, float("inf")))
            vmax = tl.maximum(vmax, tl.where(col_ok, x, float("-inf")))
    return tl.min(vmin, axis=1), tl.max(vmax, axis=1)


@triton.jit
def _row_qparams(rmin, rmax, a_lo, a_hi, clip_ratio, qmax, inv_qmax, eps,
                 RECIPROCAL: tl.constexpr, FMA_DIV: tl.constexpr):
    """``codes.act_clip_range`` + ``codes.act_qparams`` per row: (unclamped scale, scale, 1/scale, zero point).

    RECIPROCAL: torch divides a tensor by the Python int qmax as a product with its float32 reciprocal on
    CUDA and as a true division on CPU; mirror whichever the reference runs."""
    lo = a_lo * (rmin * clip_ratio)
    hi = a_hi * (rmax * clip_ratio)
    if RECIPROCAL:
        raw = (hi - lo) * inv_qmax
    else:
        raw = tl.math.div_rn(hi - lo, qmax)
    scale = tl.maximum(raw, eps)
    recip = tl.math.div_rn(1.0, scale)
    zero = tl.minimum(tl.maximum(-round_half_even(divide_exact(lo, scale, recip, FMA_DIV)), 0.0), qmax)
    return raw, scale, recip, zero


@triton.jit
def row_range_kernel(x_ptr, rmin_ptr, rmax_ptr, n_rows,
                     N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Local row ranges of a row split over tensor-parallel ranks (all-reduced by the caller)."""
    rows, row_ok, base = _row_block(n_rows, N, BLOCK_M)
    rmin, rmax = _row_range(x_ptr, base, row_ok, N, BLOCK_M, BLOCK_N, N % BLOCK_N == 0)
    tl.store(rmin_ptr + rows, rmin, mask=row_ok)
    tl.store(rmax_ptr + rows, rmax, mask=row_ok)


@triton.autotune(configs=_autotune_configs(_FWD_CONFIGS), key=["N", "RANGE_GIVEN"], **_TUNE)
@triton.jit
def act_fake_quant_fwd_kernel(x_ptr, out_ptr, rmin_ptr, rmax_ptr, alo_ptr, ahi_ptr, n_rows,
                              clip_ratio, qmax, inv_qmax, eps,
                              N: tl.constexpr, RANGE_GIVEN: tl.constexpr, RECIPROCAL: tl.constexpr,
                              FMA_DIV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``x_hat = s * (clamp(round(x / s) + z, 0, qmax) - z)`` in x's dtype.

    RANGE_GIVEN: the row min/max were reduced over a TP group and are read; otherwise computed here and
    written (the backward needs them)."""
    EVEN: tl.constexpr = N % BLOCK_N == 0
    rows, row_ok, base = _row_block(n_rows, N, BLOCK_M)
    if RANGE_GIVEN:
        rmin = tl.load(rmin_ptr + rows)
        rmax = tl.load(rmax_ptr + rows)
    else:
        rmin, rmax = _row_range(x_ptr, base, row_ok, N, BLOCK_M, BLOCK_N, EVEN)
        tl.store(rmin_ptr + rows, rmin, mask=row_ok)
        tl.store(rmax_ptr + rows, rmax, mask=row_ok)
    raw, scale, recip, zero = _row_qparams(rmin, rmax, tl.load(alo_ptr + rows), tl.load(ahi_ptr + rows),
                                           clip_ratio, qmax, inv_qmax, eps, RECIPROCAL, FMA_DIV)
    s, r, z = scale[:, None], recip[:, None], zero[:, None]
    for k0 in range(0, N, BLOCK_N):
        offs, cols, col_ok, store_ok = _chunk(base, row_ok, k0, N, BLOCK_N, EVEN)
        x = _load_chunk(x_ptr, offs, col_ok, EVEN)
        q = tl.minimum(tl.maximum(round_half_even(divide_exact(x, s, r, FMA_DIV)) + z, 0.0), qmax)
        store_rounded(out_ptr, offs, s * (q - z), store_ok, FMA_DIV)


@triton.jit
def _dx(x, g, s, r, z, qmax, rmin, rmax, share_min, share_max, FMA_DIV: tl.constexpr):
    """dx of elements: the straight-through gradient + their extreme shares.

    The reference computes the straight-through part as ``(g * s) / s`` where the clamp passes: ``g`` up
    to one float32 rounding, exactly ``g`` once stored in bfloat16 (``g`` is a bfloat16 value)."""
    t = round_half_even(divide_exact(x, s, r, FMA_DIV)) + z
    dx = tl.where((t >= 0.0) & (t <= qmax), g, 0.0)
    dx += tl.where(x == rmax, share_max, 0.0)
    dx += tl.where(x == rmin, share_min, 0.0)
    return dx


@triton.jit
def _scan_row(x_ptr, g_ptr, dx_ptr, base, row_ok, rmin, rmax, scale, recip, zero, qmax,
              N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
              FMA_DIV: tl.constexpr):
    """The one pass over x and the output gradient: writes the straight-through dx and returns per row
    d loss / d scale (both uses of s: x / s and s * (q - z)), and the count and first index of the
    elements equal to the row max and min."""
    s, r, z = scale[:, None], recip[:, None], zero[:, None]
    lo, hi = rmin[:, None], rmax[:, None]
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    n_max = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    n_min = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    i_max = tl.full([BLOCK_M, BLOCK_N], N, tl.int32)
    i_min = tl.full([BLOCK_M, BLOCK_N], N, tl.int32)
    for k0 in range(0, N, BLOCK_N):
        offs, cols, col_ok, store_ok = _chunk(base, row_ok, k0, N, BLOCK_N, EVEN)
        x = _load_chunk(x_ptr, offs, col_ok, EVEN)
        g = _load_chunk(g_ptr, offs, col_ok, EVEN)
        v = divide_exact(x, s, r, FMA_DIV)
        t = round_half_even(v) + z
        q = tl.minimum(tl.maximum(t, 0.0), qmax)
        inside = (t >= 0.0) & (t <= qmax)
        dv = tl.where(inside, g * s, 0.0)
        store_rounded(dx_ptr, offs, tl.where(inside, g, 0.0), store_ok, FMA_DIV)
        # MulBackward of s * (q - z) and DivBackward of x / s (-grad * ((x / s) / s); a product with 1/s is
        # rounding-close, and this sum is not required bit for bit)
        acc_s += g * (q - z) + (-dv) * (v * r)
        if EVEN:
            is_max = x == hi
            is_min = x == lo
        else:
            is_max = (x == hi) & col_ok
            is_min = (x == lo) & col_ok
        n_max += is_max.to(tl.int32)
        n_min += is_min.to(tl.int32)
        i_max = tl.minimum(i_max, tl.where(is_max, cols[None, :], N))
        i_min = tl.minimum(i_min, tl.where(is_min, cols[None, :], N))
    return (tl.sum(acc_s, axis=1), tl.sum(n_max, axis=1), tl.sum(n_min, axis=1),
            tl.min(i_max, axis=1), tl.min(i_min, axis=1))


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
def _rewrite_element(x_ptr, g_ptr, dx_ptr, offs, ok, s, r, z, qmax, lo, hi, sh_min, sh_max, FMA_DIV: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    store_rounded(dx_ptr, offs, _dx(x, g, s, r, z, qmax, lo, hi, sh_min, sh_max, FMA_DIV), ok, FMA_DIV)


@triton.jit
def _add_extreme_shares(x_ptr, g_ptr, dx_ptr, base, row_ok, rmin, rmax, scale, recip, zero, qmax,
                        share_min, share_max, i_max, i_min, n_max, n_min,
                        N: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, FMA_DIV: tl.constexpr):
    """Rewrite dx where this rank holds a row extreme (local counts ``n_max``/``n_min``, first index
    ``i_max``/``i_min``): one element each, or the program's whole rows when one of them has ties."""
    tl.debug_barrier()   # order these stores after the straight-through ones of other threads
    s, r, z = scale[:, None], recip[:, None], zero[:, None]
    lo, hi = rmin[:, None], rmax[:, None]
    sh_min, sh_max = share_min[:, None], share_max[:, None]
    ties = tl.max(tl.where(row_ok & ((n_max > 1) | (n_min > 1)), 1, 0), axis=0)
    if ties > 0:
        for k0 in range(0, N, BLOCK_N):
            offs, cols, col_ok, store_ok = _chunk(base, row_ok, k0, N, BLOCK_N, EVEN)
            x = _load_chunk(x_ptr, offs, col_ok, EVEN)
            g = _load_chunk(g_ptr, offs, col_ok, EVEN)
            store_rounded(dx_ptr, offs, _dx(x, g, s, r, z, qmax, lo, hi, sh_min, sh_max, FMA_DIV), store_ok, FMA_DIV)
    else:
        _rewrite_element(x_ptr, g_ptr, dx_ptr, base + i_max.to(tl.int64)[:, None], (row_ok & (n_max == 1))[:, None],
                         s, r, z, qmax, lo, hi, sh_min, sh_max, FMA_DIV)
        _rewrite_element(x_ptr, g_ptr, dx_ptr, base + i_min.to(tl.int64)[:, None], (row_ok & (n_min == 1))[:, None],
                         s, r, z, qmax, lo, hi, sh_min, sh_max, FMA_DIV)


@triton.autotune(configs=_autotune_configs(_BWD_CONFIGS), key=["N", "PHASE"], **_TUNE)
@triton.jit
def act_fake_quant_bwd_kernel(x_ptr, g_ptr, dx_ptr, rmin_ptr, rmax_ptr, alo_ptr, ahi_ptr, galo_ptr, gahi_ptr,
                              ext_ptr, n_rows, clip_ratio, qmax, inv_qmax, eps,
                              N: tl.constexpr, PHASE: tl.constexpr, RECIPROCAL: tl.constexpr,
                              FMA_DIV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward of the activation fake quantiser.

    PHASE 0 (whole row on this rank): the pass over the row, then the extremes' shares, in one program.
    PHASE 1 (row split over TP ranks): the pass only; writes the clip factors' gradients and ``ext``
    [8, rows]: lines 0-3 the local gradients of the row max/min and the local tie counts, which the
    caller sums over the group (what tp_reduce's backward all-reduces), lines 4-7 the local counts and
    first indices.
    PHASE 2: the extremes' shares from the summed ``ext``."""
    EVEN: tl.constexpr = N % BLOCK_N == 0
    rows, row_ok, base = _row_block(n_rows, N, BLOCK_M)
    rmin = tl.load(rmin_ptr + rows)
    rmax = tl.load(rmax_ptr + rows)
    a_lo = tl.load(alo_ptr + rows)
    a_hi = tl.load(ahi_ptr + rows)
    raw, scale, recip, zero = _row_qparams(rmin, rmax, a_lo, a_hi, clip_ratio, qmax, inv_qmax, eps,
                                           RECIPROCAL, FMA_DIV)
    if PHASE == 2:
        g_rmax = tl.load(ext_ptr + rows)
        g_rmin = tl.load(ext_ptr + n_rows + rows)
        c_max = tl.load(ext_ptr + 2 * n_rows + rows)
        c_min = tl.load(ext_ptr + 3 * n_rows + rows)
        n_max = tl.load(ext_ptr + 4 * n_rows + rows).to(tl.int32)
        n_min = tl.load(ext_ptr + 5 * n_rows + rows).to(tl.int32)
        i_max = tl.load(ext_ptr + 6 * n_rows + rows).to(tl.int32)
        i_min = tl.load(ext_ptr + 7 * n_rows + rows).to(tl.int32)
    else:
        gs, n_max, n_min, i_max, i_min = _scan_row(x_ptr, g_ptr, dx_ptr, base, row_ok, rmin, rmax, scale, recip,
                                                   zero, qmax, N, BLOCK_M, BLOCK_N, EVEN, FMA_DIV)
        g_alo, g_ahi, g_rmin, g_rmax = _range_grads(gs, raw, rmin, rmax, a_lo, a_hi, clip_ratio, qmax, inv_qmax,
                                                    eps, RECIPROCAL)
        tl.store(galo_ptr + rows, g_alo, mask=row_ok)
        tl.store(gahi_ptr + rows, g_ahi, mask=row_ok)
        c_max = n_max.to(tl.float32)
        c_min = n_min.to(tl.float32)
        if PHASE == 1:
            tl.store(ext_ptr + rows, g_rmax, mask=row_ok)
            tl.store(ext_ptr + n_rows + rows, g_rmin, mask=row_ok)
            tl.store(ext_ptr + 2 * n_rows + rows, c_max, mask=row_ok)
            tl.store(ext_ptr + 3 * n_rows + rows, c_min, mask=row_ok)
            tl.store(ext_ptr + 4 * n_rows + rows, c_max, mask=row_ok)
            tl.store(ext_ptr + 5 * n_rows + rows, c_min, mask=row_ok)
            tl.store(ext_ptr + 6 * n_rows + rows, i_max.to(tl.float32), mask=row_ok)
            tl.store(ext_ptr + 7 * n_rows + rows, i_min.to(tl.float32), mask=row_ok)
    if PHASE != 1:
        # torch.amax/amin backward: (grad / count) on each tied element, counted over the whole row
        share_max = tl.math.div_rn(g_rmax, tl.maximum(c_max, 1.0))
        share_min = tl.math.div_rn(g_rmin, tl.maximum(c_min, 1.0))
        _add_extreme_shares(x_ptr, g_ptr, dx_ptr, base, row_ok, rmin, rmax, scale, recip, zero, qmax,
                            share_min, share_max, i_max, i_min, n_max, n_min, N, BLOCK_N, EVEN, FMA_DIV)


def range_block_sizes(n_cols: int):
    """(BLOCK_M, BLOCK_N, num_warps) of the TP range kernel (a plain two-way reduction)."""
    return 1, min(triton.next_power_of_2(n_cols), 1024), 4
