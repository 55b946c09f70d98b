"""Triton kernels of the fused LSQ+ weight fake quantiser with the auxiliary low-rank term.

Forward: ``W_eff = s * (clamp(round(W / s + z), 0, qmax) - z) + L @ R`` in one pass over W, the codes
computed with the float32 operations of ``qvgen_kernels.codes`` in the same order (IEEE division,
ties-to-even rounding, no fused multiply-adds), so Qw(W) is bit-identical to the reference; the rank-r
product is a small dot per tile.

Backward, given G = d loss / d W_eff: one row-owning pass writes dW (straight-through inside the clamp
range), the LSQ+ row sums d/ds and d/dz, and dL = G @ R^T; a column-owning pass gives partial sums of
dR = L^T @ G over slices of the rows, added up by the caller. No atomics: deterministic.

Sizes are compile-time constants (see fused_act_kernels); the rank is padded to a power of two >= 16 for
``tl.dot`` with masked (zero) columns.
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron_qvgen.quant.fused_store import store_rounded
from qvgen_kernels.act_quant_triton import round_half_even


@triton.jit
def _dequant_tile(w, s, z, qmax):
    """(u = w / s, the rounded code before clamping, the code, w_hat) of ``codes.weight_codes``/``weight_dequant``."""
    u = tl.math.div_rn(w, s)
    r = round_half_even(u + z)
    q = tl.minimum(tl.maximum(r, 0.0), qmax)
    return u, r, q, s * (q - z)


@triton.jit
def weight_fake_quant_fwd_kernel(w_ptr, s_ptr, z_ptr, l_ptr, r_ptr, out_ptr, qmax,
                                 N_OUT: tl.constexpr, K: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                                 HAS_AUX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N_OUT
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=row_mask, other=1.0)[:, None]
    z = tl.load(z_ptr + rows, mask=row_mask, other=0.0)[:, None]
    _, _, _, w_hat = _dequant_tile(w, s, z, qmax)
    if HAS_AUX:
        ranks = tl.arange(0, RANK_PAD)
        left = tl.load(l_ptr + rows[:, None] * RANK + ranks[None, :],
                       mask=row_mask[:, None] & (ranks < RANK)[None, :], other=0.0).to(tl.float32)
        right = tl.load(r_ptr + ranks[:, None] * K + cols[None, :],
                        mask=(ranks < RANK)[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        w_hat = w_hat + tl.dot(left, right, input_precision=DOT_PRECISION)
    store_rounded(out_ptr, offs, w_hat, mask)


@triton.jit
def weight_fake_quant_bwd_rows_kernel(g_ptr, w_ptr, s_ptr, z_ptr, r_ptr, dw_ptr, ds_ptr, dz_ptr, dl_ptr, qmax,
                                      N_OUT: tl.constexpr, K: tl.constexpr, RANK: tl.constexpr,
                                      RANK_PAD: tl.constexpr, HAS_AUX: tl.constexpr, BLOCK_M: tl.constexpr,
                                      BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dW, d/ds, d/dz (before LSQ's gradient scaling, applied by autograd outside) and dL for BLOCK_M rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N_OUT
    s = tl.load(s_ptr + rows, mask=row_mask, other=1.0)[:, None]
    z = tl.load(z_ptr + rows, mask=row_mask, other=0.0)[:, None]
    inv_s = tl.math.div_rn(1.0, s)   # gradient-only quotient: a product is rounding-close and cheaper
    cols0 = tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, RANK_PAD)
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_z = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_l = tl.zeros([BLOCK_M, RANK_PAD], tl.float32)
    for k0 in range(0, K, BLOCK_N):
        cols = k0 + cols0
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * K + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u, r, q, _ = _dequant_tile(w, s, z, qmax)
        g_s = g * s                                   # d/d(q - z) of s * (q - z)
        dv = tl.where((r >= 0.0) & (r <= qmax), g_s, 0.0)  # through clamp and the straight-through round
        store_rounded(dw_ptr, offs, tl.math.div_rn(dv, s), mask)
        # s: from s * (q - z) and from w / s (-grad * ((w / s) / s)); z: from + z and from - z
        acc_s += g * (q - z) + (-dv) * (u * inv_s)
        acc_z += dv - g_s
        if HAS_AUX:
            right = tl.load(r_ptr + ranks[:, None] * K + cols[None, :],
                            mask=(ranks < RANK)[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            acc_l += tl.dot(g, tl.trans(right), input_precision=DOT_PRECISION)
    tl.store(ds_ptr + rows, tl.sum(acc_s, axis=1), mask=row_mask)
    tl.store(dz_ptr + rows, tl.sum(acc_z, axis=1), mask=row_mask)
    if HAS_AUX:
        store_rounded(dl_ptr, rows[:, None] * RANK + ranks[None, :], acc_l,
                      row_mask[:, None] & (ranks < RANK)[None, :])


@triton.jit
def weight_fake_quant_bwd_right_kernel(g_ptr, l_ptr, part_ptr,
                                       N_OUT: tl.constexpr, K: tl.constexpr, RANK: tl.constexpr,
                                       RANK_PAD: tl.constexpr, ROWS_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                                       BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Partial dR = L^T @ G over one slice of the output rows (program axis 1) for BLOCK_N columns.

    The caller sums the float32 partials [splits, rank, K]: enough programs to fill the GPU even when
    K is small (Wan-1.3B: K = 1536 is only 24 column blocks), still deterministic."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    col_mask = cols < K
    rows0 = tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, RANK_PAD)
    acc = tl.zeros([RANK_PAD, BLOCK_N], tl.float32)
    for m0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
        rows = (split * ROWS_PER_SPLIT + m0 + rows0).to(tl.int64)
        row_mask = rows < N_OUT
        g = tl.load(g_ptr + rows[:, None] * K + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        left_t = tl.load(l_ptr + rows[None, :] * RANK + ranks[:, None],
                         mask=(ranks < RANK)[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(left_t, g, input_precision=DOT_PRECISION)
    tl.store(part_ptr + (split * RANK + ranks[:, None]) * K + cols[None, :], acc,
             mask=(ranks < RANK)[:, None] & col_mask[None, :])


def rank_padding(rank: int) -> int:
    """``tl.dot`` needs every dimension >= 16 and a power of two."""
    return max(16, triton.next_power_of_2(rank))
