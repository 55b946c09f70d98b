"""Triton kernels of the fused LSQ+ weight fake quantiser with the auxiliary low-rank term.

Forward: ``W_eff = s * (clamp(round(W / s + z), 0, qmax) - z) + L @ R`` in one pass over W, the codes
computed with the float32 operations of ``qvgen_kernels.codes`` in the same order (IEEE-exact division,
ties-to-even rounding, no contracted multiply-adds), so Qw(W) is bit-identical to the reference; the
rank-r product is a small dot per tile (three tf32 passes: float32-accurate, L carries gamma).

Backward, given G = d loss / d W_eff: a pass over slices of columns writes dW (straight-through inside
the clamp range) and partial sums of the LSQ+ row sums d/ds, d/dz and of dL = G @ R^T (a bf16 dot when G
and R are bf16: their products are exact in float32); a second pass gives partial sums of dR = L^T @ G
over slices of rows. The caller adds the float32 partials: no atomics, deterministic, and enough programs
to fill the GPU whatever the shape.

Sizes are compile-time constants (see fused_act_kernels); the rank is padded to a power of two >= 16 for
``tl.dot`` with masked (zero) columns. Tiles are autotuned per shape on the GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from megatron_qvgen.quant.fused_store import autotune_configs, store_rounded
from qvgen_kernels.act_quant_triton import divide_exact, round_half_even

# (BLOCK_M, BLOCK_N, warps) tried on the GPU; the interpreter runs the first.
_FWD_CONFIGS = [(32, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 8)]
_BWD_CONFIGS = [(16, 128, 4), (16, 64, 4), (16, 256, 8), (32, 64, 4)]
BWD_COLS_PER_SPLIT = 1024   # columns a backward program walks (a multiple of every BLOCK_N above)


def _autotune_configs(specs):
    return autotune_configs(specs, specs[0])


_TUNE = dict(warmup=10, rep=40)


@triton.jit
def _dequant_tile(w, s, r, z, qmax, FMA_DIV: tl.constexpr):
    """(u = w / s, the rounded code before clamping, the code, w_hat) of ``codes.weight_codes``/``weight_dequant``."""
    u = divide_exact(w, s, r, FMA_DIV)
    rounded = round_half_even(u + z)
    q = tl.minimum(tl.maximum(rounded, 0.0), qmax)
    return u, rounded, q, s * (q - z)


@triton.jit
def _row_quant_params(s_ptr, z_ptr, rows, row_ok):
    s = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
    z = tl.load(z_ptr + rows, mask=row_ok, other=0.0)
    return s[:, None], tl.math.div_rn(1.0, s)[:, None], z[:, None]


@triton.autotune(configs=_autotune_configs(_FWD_CONFIGS), key=["N_OUT", "K", "RANK", "HAS_AUX"], **_TUNE)
@triton.jit
def weight_fake_quant_fwd_kernel(w_ptr, s_ptr, z_ptr, l_ptr, r_ptr, out_ptr, qmax,
                                 N_OUT: tl.constexpr, K: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                                 HAS_AUX: tl.constexpr, DOT_PRECISION: tl.constexpr, FMA_DIV: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N_OUT
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, r, z = _row_quant_params(s_ptr, z_ptr, rows, row_ok)
    u, rounded, q, w_hat = _dequant_tile(w, s, r, z, qmax, FMA_DIV)
    if HAS_AUX:
        ranks = tl.arange(0, RANK_PAD)
        left = tl.load(l_ptr + rows[:, None] * RANK + ranks[None, :],
                       mask=row_ok[:, None] & (ranks < RANK)[None, :], other=0.0).to(tl.float32)
        right = tl.load(r_ptr + ranks[:, None] * K + cols[None, :],
                        mask=(ranks < RANK)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        w_hat = w_hat + tl.dot(left, right, input_precision=DOT_PRECISION)
    store_rounded(out_ptr, offs, w_hat, mask, FMA_DIV)


def _prune_split(configs, named_args, **kwargs):
    """A program's column slice must be a whole number of BLOCK_N chunks."""
    return [c for c in configs if kwargs["COLS_PER_SPLIT"] % c.kwargs["BLOCK_N"] == 0] or configs[:1]


@triton.autotune(configs=_autotune_configs(_BWD_CONFIGS), key=["N_OUT", "K", "RANK", "HAS_AUX", "DOT_BF16"],
                 prune_configs_by={"early_config_prune": _prune_split}, **_TUNE)
@triton.jit
def weight_fake_quant_bwd_rows_kernel(g_ptr, w_ptr, s_ptr, z_ptr, r_ptr, dw_ptr, ds_ptr, dz_ptr, dl_ptr, qmax,
                                      N_OUT: tl.constexpr, K: tl.constexpr, RANK: tl.constexpr,
                                      RANK_PAD: tl.constexpr, HAS_AUX: tl.constexpr, COLS_PER_SPLIT: tl.constexpr,
                                      DOT_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, FMA_DIV: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dW, and for this column slice (program axis 1) the partial d/ds, d/dz (before LSQ's gradient
    scaling, applied by autograd outside) and dL of BLOCK_M rows: ``ds``/``dz`` [splits, N_OUT],
    ``dl`` [splits, N_OUT, RANK] float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < N_OUT
    s, r, z = _row_quant_params(s_ptr, z_ptr, rows, row_ok)
    cols0 = split * COLS_PER_SPLIT + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, RANK_PAD)
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_z = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_l = tl.zeros([BLOCK_M, RANK_PAD], tl.float32)
    for k0 in range(0, COLS_PER_SPLIT, BLOCK_N):
        cols = (k0 + cols0).to(tl.int64)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * K + cols[None, :]
        g_raw = tl.load(g_ptr + offs, mask=mask, other=0.0)
        g = g_raw.to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u, rounded, q, w_hat = _dequant_tile(w, s, r, z, qmax, FMA_DIV)   # w_hat unused: compiled away
        g_s = g * s                                             # d/d(q - z) of s * (q - z)
        inside = (rounded >= 0.0) & (rounded <= qmax)           # clamp, straight-through round
        dv = tl.where(inside, g_s, 0.0)
        # dW: the reference's (g * s) / s, i.e. g up to one float32 rounding (exact once stored in bf16)
        store_rounded(dw_ptr, offs, tl.where(inside, g, 0.0), mask, FMA_DIV)
        # s: from s * (q - z) and from w / s (-grad * ((w / s) / s), as a product with 1/s: rounding-close);
        # z: from + z and from - z
        acc_s += g * (q - z) + (-dv) * (u * r)
        acc_z += dv - g_s
        if HAS_AUX:
            right = tl.load(r_ptr + ranks[:, None] * K + cols[None, :],
                            mask=(ranks < RANK)[:, None] & col_ok[None, :], other=0.0)
            if DOT_BF16:
                acc_l += tl.dot(g_raw, tl.trans(right))
            else:
                acc_l += tl.dot(g, tl.trans(right.to(tl.float32)), input_precision=DOT_PRECISION)
    part = split * N_OUT + rows
    tl.store(ds_ptr + part, tl.sum(acc_s, axis=1), mask=row_ok)
    tl.store(dz_ptr + part, tl.sum(acc_z, axis=1), mask=row_ok)
    if HAS_AUX:
        tl.store(dl_ptr + part[:, None] * RANK + ranks[None, :], acc_l,
                 mask=row_ok[:, None] & (ranks < RANK)[None, :])


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
    col_ok = cols < K
    rows0 = tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, RANK_PAD)
    acc = tl.zeros([RANK_PAD, BLOCK_N], tl.float32)
    for m0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
        rows = (split * ROWS_PER_SPLIT + m0 + rows0).to(tl.int64)
        row_ok = rows < N_OUT
        g = tl.load(g_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        left_t = tl.load(l_ptr + rows[None, :] * RANK + ranks[:, None],
                         mask=(ranks < RANK)[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(left_t, g, input_precision=DOT_PRECISION)
    tl.store(part_ptr + (split * RANK + ranks[:, None]) * K + cols[None, :], acc,
             mask=(ranks < RANK)[:, None] & col_ok[None, :])


def rank_padding(rank: int) -> int:
    """``tl.dot`` needs every dimension >= 16 and a power of two."""
    return max(16, triton.next_power_of_2(rank))
