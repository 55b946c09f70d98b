"""Norms that stay in full precision and are never quantized.

- ``DistributedRMSNorm``: RMSNorm over the WHOLE hidden size of a TP-sharded activation (Wan's q/k norm
  ``rms_norm_across_heads``). Each rank holds its slice of the weight; the sum of squares is all-reduced
  over the TP group (forward and backward), never the activation itself.
- ``FP32LayerNorm``: LayerNorm computed in (at least) fp32 whatever the activation dtype (diffusers'
  FP32LayerNorm).
  Under sequence parallelism its affine parameters see only this rank's tokens: they are tagged
  ``sequence_parallel`` so their gradients are summed over TP (``reduce_sequence_parallel_grads``, or
  megatron's finalize_model_grads).
- ``HeadLayerNorm``: LayerNorm over each head's channels with one affine shared by all heads
  (CogVideoX's q/k norm, diffusers ``qk_norm="layer_norm"``). Under TP each rank normalises its own heads,
  so the shared affine's gradient is partial: it is summed over TP (identity forward, all-reduce backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                           set_tensor_model_parallel_attributes)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision activations; float64 stays float64 (reference runs)."""
    return torch.promote_types(dtype, torch.float32)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward AND backward: every rank's output depends on every rank's input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class DistributedRMSNorm(torch.nn.Module):
    """y = x * rsqrt(mean(x^2 over all TP shards) + eps) * w, for x sharded on its last dimension."""

    def __init__(self, hidden_size: int, eps: float, config):
        super().__init__()
        tp = config.tensor_model_parallel_size
        if hidden_size % tp:
            raise ValueError(f"DistributedRMSNorm: hidden size {hidden_size} not divisible by TP={tp}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size // tp, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = xf.square().sum(dim=-1, keepdim=True)
        group = parallel_state.get_tensor_model_parallel_group()
        if group.size() > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, group)
        y = xf * torch.rsqrt(sum_sq / self.hidden_size + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"])


class FP32LayerNorm(torch.nn.LayerNorm):
    """LayerNorm in fp32; returns the input dtype."""

    def __init__(self, hidden_size: int, eps: float, elementwise_affine: bool, config):
        super().__init__(hidden_size, eps=eps, elementwise_affine=elementwise_affine,
                         dtype=config.params_dtype)
        if config.sequence_parallel:
            for param in self.parameters():
                param.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _at_least_fp32(x.dtype)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class HeadLayerNorm(torch.nn.Module):
    """LayerNorm of every head of x [..., local_heads * head_dim], computed in (at least) fp32.

    Built like the other q/k norms (``hidden_size, eps, config``); the head size is megatron's
    ``config.kv_channels``.
    """

    def __init__(self, hidden_size: int, eps: float, config):
        super().__init__()
        self.head_dim = config.kv_channels
        if hidden_size % self.head_dim:
            raise ValueError(f"HeadLayerNorm: hidden size {hidden_size} is not a multiple of head size {self.head_dim}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.head_dim, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(self.head_dim, dtype=config.params_dtype))
        self.tensor_parallel = config.tensor_model_parallel_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.tensor_parallel:
            weight, bias = copy_to_tensor_model_parallel_region(weight), copy_to_tensor_model_parallel_region(bias)
        dtype = _at_least_fp32(x.dtype)
        heads = x.to(dtype).unflatten(-1, (-1, self.head_dim))
        y = F.layer_norm(heads, (self.head_dim,), weight.to(dtype), bias.to(dtype), self.eps)
        return y.flatten(-2).to(x.dtype)
