"""Tensor-parallel reductions that keep the quantizers' numerics independent of TP size.

A row-parallel layer holds a slice of every token's input row and of every output channel's weight row,
so per-token activation ranges and per-channel weight statistics are reduced over the TP group. The
gradient through a reduced max/min reaches exactly the elements that ``torch.amax``/``amin`` of the
whole row would give it to (ties share it evenly, counted over all ranks).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _RowExtremeAcrossGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, use_max: bool):
        local = x.amax(dim=-1, keepdim=True) if use_max else x.amin(dim=-1, keepdim=True)
        result = local.clone()
        dist.all_reduce(result, op=dist.ReduceOp.MAX if use_max else dist.ReduceOp.MIN, group=group)
        ctx.group = group
        ctx.save_for_backward(x, result)
        return result

    @staticmethod
    def backward(ctx, grad):
        x, result = ctx.saved_tensors
        grad = grad.contiguous().clone()
        # Each rank saw only its share of the downstream use of the row extreme: sum them.
        dist.all_reduce(grad, group=ctx.group)
        hits = (x == result).to(grad.dtype)
        count = hits.sum(dim=-1, keepdim=True)
        dist.all_reduce(count, group=ctx.group)
        return hits * (grad / count), None, None


def row_max(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Max over the last dimension of a row that is split across ``group`` (keepdim)."""
    if group_size(group) == 1:
        return x.amax(dim=-1, keepdim=True)
    return _RowExtremeAcrossGroup.apply(x, group, True)


def row_min(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    if group_size(group) == 1:
        return x.amin(dim=-1, keepdim=True)
    return _RowExtremeAcrossGroup.apply(x, group, False)


def sum_grad_over_group(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward.

    For parameters replicated across TP ranks whose gradient differs per rank (each rank sees part of
    their use): R of a column-parallel layer, L and scale/zero of a row-parallel one, clip logits.
    """
    if group_size(group) == 1:
        return t
    return copy_to_tensor_model_parallel_region(t, group=group)


def all_reduce_sum(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """In-place sum over ``group`` of a tensor that carries no gradient (statistics, Gram matrices)."""
    if group_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t
