"""Tensor-parallel feed-forward network: column-parallel up projection, activation, row-parallel down.

Named like diffusers' ``FeedForward`` (``net.0.proj``, ``net.2``; index 1 is diffusers' dropout) so
parameters map one to one and quantized linears carry diffusers names.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_qvgen.models.common.embeddings import ACTIVATIONS
from megatron_qvgen.models.common.linears import LinearSpecs, build_column, build_row, linear_out


class _ActivationProjection(torch.nn.Module):
    """diffusers' ``GELU`` wrapper: a projection (``proj``) followed by the activation."""

    def __init__(self, proj, activation):
        super().__init__()
        self.proj = proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(linear_out(self.proj, x))


class ParallelFeedForward(MegatronModule):
    def __init__(self, config, linears: LinearSpecs, *, hidden_size: int, ffn_dim: int, name: str,
                 activation: str = "gelu_tanh"):
        super().__init__(config)
        tp = config.tensor_model_parallel_size
        if ffn_dim % tp:
            raise ValueError(f"{name}: FFN size {ffn_dim} is not divisible by TP={tp}")
        up = build_column(linears.column, hidden_size, ffn_dim, name=f"{name}.net.0.proj", config=config)
        down = build_row(linears.row, ffn_dim, hidden_size, name=f"{name}.net.2", config=config)
        self.net = torch.nn.ModuleList([_ActivationProjection(up, ACTIVATIONS[activation]),
                                        torch.nn.Identity(), down])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_out(self.net[2], self.net[0](x))
