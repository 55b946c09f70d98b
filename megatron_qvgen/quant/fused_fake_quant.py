"""Fused Triton fake quantisation: what ``fake_quant`` dispatches to for CUDA tensors.

Same contract as ``fake_quant_activation_reference`` / ``fake_quant_weight_reference``: bit-identical
forward, the reference autograd's gradients up to float rounding. Written plainly, the reference runs
about a dozen float32 elementwise passes over every activation and weight, forward and backward, and
keeps several float32 copies alive for the backward; here each direction is one or two passes over the
data (kernels in ``fused_act_kernels`` / ``fused_weight_kernels``) and the backward keeps only the input
and a few numbers per row.

Where the two differ by more than float32 noise, the reference is the less accurate one: with bf16
scale/zero parameters its LSQ+ gradients are the difference of two separately bf16-rounded, nearly equal
sums (the two uses of ``scale.float()``); here each row sum is formed in float32 and rounded once.

Tensor parallelism (``row_group`` with several ranks, a row-parallel input): the local row ranges are
all-reduced (MIN/MAX) before quantising; the backward sums over the group the gradients of the row
extremes and the tie counts, exactly what ``tp_reduce.row_min``/``row_max``'s backward all-reduces.

Runs on CPU tensors too when Triton's interpreter is active (tests); the dispatch point only sends
CUDA tensors here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import triton

from megatron_qvgen.quant.fused_act_kernels import (act_fake_quant_bwd_kernel, act_fake_quant_fwd_kernel,
                                                    range_block_sizes, row_range_kernel)
from megatron_qvgen.quant.fused_weight_kernels import (BWD_COLS_PER_SPLIT, rank_padding,
                                                       weight_fake_quant_bwd_right_kernel,
                                                       weight_fake_quant_bwd_rows_kernel, weight_fake_quant_fwd_kernel)
from megatron_qvgen.quant.ste import scale_grad
from megatron_qvgen.quant.tp_reduce import group_size
from qvgen_kernels import codes
from qvgen_kernels.act_quant import scalar_division_uses_reciprocal

# Bit-identical codes need the reference's exact float32 operation sequence: no a*b+c contracted to fma.
_EXACT = dict(enable_fp_fusion=False)

_W_BWD_RIGHT_TILE = (64, 64)   # dR pass (rows, cols)
_FILL_PROGRAMS = 4 * 132       # enough programs for every SM of an H100 (132) a few times over


def _dot_precision(t: torch.Tensor) -> str:
    """fp32-accurate products with tensor cores on the GPU (three tf32 passes); the interpreter's numpy
    matmul is float32 whatever is asked."""
    return "tf32x3" if t.is_cuda else "ieee"


def _scalars(bits: int, device: torch.device):
    """(qmax, 1/qmax in float32, whether torch divides by a scalar through its reciprocal here, whether the
    kernels divide with fused multiply-adds: compiled GPU code yes, the interpreter no)."""
    qmax = codes.qmax(bits)
    inv_qmax = float(np.float32(1) / np.float32(qmax))
    return float(qmax), inv_qmax, scalar_division_uses_reciprocal(device.type), device.type == "cuda"


def _row_grid(n_rows):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)


# ---------------------------------------------------------------- activations
class _ActivationFakeQuant(torch.autograd.Function):
    """x2d [rows, hidden]; a_lo_rows/a_hi_rows [rows] float32 clip factors (already expanded per row)."""

    @staticmethod
    def forward(ctx, x2d, a_lo_rows, a_hi_rows, clip_ratio: float, bits: int, group):
        n_rows, n_cols = x2d.shape
        qmax, inv_qmax, reciprocal, fma_div = _scalars(bits, x2d.device)
        rmin = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
        rmax = torch.empty_like(rmin)
        split = group_size(group) > 1
        if split:
            block_m, block_n, num_warps = range_block_sizes(n_cols)
            row_range_kernel[(triton.cdiv(n_rows, block_m),)](x2d, rmin, rmax, n_rows, N=n_cols, BLOCK_M=block_m,
                                                              BLOCK_N=block_n, num_warps=num_warps)
            extremes = torch.stack((-rmin, rmax))  # negation is exact: one MAX all-reduce gives both
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
            rmin, rmax = -extremes[0], extremes[1].contiguous()
        out = torch.empty_like(x2d)
        act_fake_quant_fwd_kernel[_row_grid(n_rows)](
            x2d, out, rmin, rmax, a_lo_rows, a_hi_rows, n_rows, clip_ratio, qmax, inv_qmax, codes.SCALE_EPS,
            N=n_cols, RANGE_GIVEN=split, RECIPROCAL=reciprocal, FMA_DIV=fma_div, **_EXACT)
        ctx.save_for_backward(x2d, rmin, rmax, a_lo_rows, a_hi_rows)
        ctx.clip_ratio, ctx.bits, ctx.group, ctx.split = clip_ratio, bits, group, split
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2d, rmin, rmax, a_lo_rows, a_hi_rows = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        qmax, inv_qmax, reciprocal, fma_div = _scalars(ctx.bits, x2d.device)
        grad_out = grad_out.contiguous()
        dx = torch.empty_like(x2d)
        g_alo = torch.empty_like(a_lo_rows)
        g_ahi = torch.empty_like(a_hi_rows)
        ext = torch.zeros(8, n_rows, dtype=torch.float32, device=x2d.device) if ctx.split else rmin

        def launch(phase):
            act_fake_quant_bwd_kernel[_row_grid(n_rows)](
                x2d, grad_out, dx, rmin, rmax, a_lo_rows, a_hi_rows, g_alo, g_ahi, ext, n_rows,
                ctx.clip_ratio, qmax, inv_qmax, codes.SCALE_EPS, N=n_cols, PHASE=phase, RECIPROCAL=reciprocal,
                FMA_DIV=fma_div, **_EXACT)

        if ctx.split:
            launch(1)
            # the row extremes' gradients and tie counts of the whole row (lines 4-7 stay local)
            dist.all_reduce(ext[:4], group=ctx.group)
            launch(2)
        else:
            launch(0)
        return dx, g_alo, g_ahi, None, None, None


def fake_quant_activation(x: torch.Tensor, a_lo: torch.Tensor, a_hi: torch.Tensor, clip_ratio: float, bits: int,
                          row_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Fused twin of ``fake_quant_activation_reference``: x (..., batch, hidden), a_lo/a_hi [batch, 1]."""
    codes.check_bits(bits)
    if x.numel() == 0:
        return x.clone()
    rows_shape = tuple(x.shape[:-1]) + (1,)
    # Per-row clip factors; autograd's expand backward sums them back to [batch, 1] as the broadcast would.
    a_lo_rows = a_lo.float().expand(rows_shape).reshape(-1).contiguous()
    a_hi_rows = a_hi.float().expand(rows_shape).reshape(-1).contiguous()
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    out = _ActivationFakeQuant.apply(x2d, a_lo_rows, a_hi_rows, float(clip_ratio), bits, row_group)
    return out.view(x.shape)


# ---------------------------------------------------------------- weights
class _WeightFakeQuant(torch.autograd.Function):
    """weight [out, in]; scale/zero [out, 1] (LSQ gradient scaling already applied outside);
    aux_l [out, r] and aux_r [r, in] or both None."""

    @staticmethod
    def forward(ctx, weight, scale, zero, aux_l, aux_r, bits: int, out_dtype):
        n_out, k = weight.shape
        w = weight.contiguous()
        s = scale.reshape(-1).float().contiguous()
        z = zero.reshape(-1).float().contiguous()
        has_aux = aux_l is not None and aux_l.shape[1] > 0
        rank = aux_l.shape[1] if has_aux else 0
        left = aux_l.contiguous() if has_aux else s
        right = aux_r.contiguous() if has_aux else s
        out = torch.empty(n_out, k, dtype=out_dtype or torch.float32, device=w.device)
        weight_fake_quant_fwd_kernel[lambda meta: (triton.cdiv(n_out, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]))](
            w, s, z, left, right, out, float(codes.qmax(bits)), N_OUT=n_out, K=k, RANK=max(rank, 1),
            RANK_PAD=rank_padding(rank), HAS_AUX=has_aux, DOT_PRECISION=_dot_precision(w), FMA_DIV=w.is_cuda,
            **_EXACT)
        ctx.save_for_backward(w, s, z, left, right)
        ctx.bits, ctx.rank, ctx.has_aux = bits, rank, has_aux
        ctx.dtypes = (weight.dtype, scale.dtype, zero.dtype)
        ctx.shapes = (scale.shape, zero.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        w, s, z, left, right = ctx.saved_tensors
        n_out, k = w.shape
        g = grad_out.contiguous()
        w_dtype, s_dtype, z_dtype = ctx.dtypes
        rank, has_aux, precision = ctx.rank, ctx.has_aux, _dot_precision(w)
        # column slices of the row pass: the whole width in the interpreter's few small cases
        cols_per_split = BWD_COLS_PER_SPLIT if w.is_cuda else 128
        splits = triton.cdiv(k, cols_per_split)
        dw = torch.empty(n_out, k, dtype=w_dtype, device=w.device)
        ds = torch.empty(splits, n_out, dtype=torch.float32, device=w.device)
        dz = torch.empty_like(ds)
        dl = torch.empty(splits, n_out, max(rank, 1), dtype=torch.float32, device=w.device)
        dot_bf16 = w.is_cuda and has_aux and g.dtype == torch.bfloat16 and right.dtype == torch.bfloat16
        weight_fake_quant_bwd_rows_kernel[lambda meta: (triton.cdiv(n_out, meta["BLOCK_M"]), splits)](
            g, w, s, z, right, dw, ds, dz, dl, float(codes.qmax(ctx.bits)), N_OUT=n_out, K=k, RANK=max(rank, 1),
            RANK_PAD=rank_padding(rank), HAS_AUX=has_aux, COLS_PER_SPLIT=cols_per_split, DOT_BF16=dot_bf16,
            DOT_PRECISION=precision, FMA_DIV=w.is_cuda, **_EXACT)
        dr = None
        if has_aux and ctx.needs_input_grad[4]:
            bm, bn = _W_BWD_RIGHT_TILE
            col_blocks = triton.cdiv(k, bn)
            r_splits = max(1, min(triton.cdiv(_FILL_PROGRAMS, col_blocks), triton.cdiv(n_out, bm)))
            rows_per_split = triton.cdiv(triton.cdiv(n_out, r_splits), bm) * bm
            r_splits = triton.cdiv(n_out, rows_per_split)
            partial = torch.empty(r_splits, rank, k, dtype=torch.float32, device=w.device)
            weight_fake_quant_bwd_right_kernel[(col_blocks, r_splits)](
                g, left, partial, N_OUT=n_out, K=k, RANK=rank, RANK_PAD=rank_padding(rank),
                ROWS_PER_SPLIT=rows_per_split, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=precision, num_warps=4)
            dr = partial.sum(0).to(right.dtype)
        scale_shape, zero_shape = ctx.shapes
        d_left = dl.sum(0).to(left.dtype) if has_aux else None
        return (dw, ds.sum(0).view(scale_shape).to(s_dtype), dz.sum(0).view(zero_shape).to(z_dtype),
                d_left, dr, None, None)


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, grad_factor: float,
                      aux_l: Optional[torch.Tensor] = None, aux_r: Optional[torch.Tensor] = None,
                      out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Fused twin of ``fake_quant_weight_reference``: ``Qw(W) + aux_l @ aux_r`` in ``out_dtype`` (default fp32)."""
    codes.check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if (aux_l is None) != (aux_r is None):
        raise ValueError("aux_l and aux_r are given together or not at all")
    # LSQ's gradient scaling, by the reference's own function: same forward value, gradient x grad_factor.
    scale = scale_grad(scale, grad_factor)
    zero = scale_grad(zero, grad_factor)
    return _WeightFakeQuant.apply(weight, scale, zero, aux_l, aux_r, bits, out_dtype)
