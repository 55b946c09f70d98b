"""Norms that stay in full precision and are never quantized.

- ``DistributedRMSNorm``: RMSNorm over the WHOLE hidden size of a TP-sharded activation (Wan's q/k norm
  ``rms_norm_across_heads``). Each rank holds its slice of the weight; the sum of squares is all-reduced
  over the TP group (forward and backward), never the activation itself.
- ``FP32LayerNorm``: LayerNorm computed in fp32 whatever the activation dtype (diffusers' FP32LayerNorm).
  Under sequence parallelism its affine parameters see only this rank's tokens: they are tagged
  ``sequence_parallel`` so their gradients are summed over TP (``reduce_sequence_parallel_grads``, or
  megatron's finalize_model_grads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


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
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
