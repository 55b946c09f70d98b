"""Tensor-parallel multi-head attention over megatron's [s, b, h] layout.

Heads are split over TP: q/k/v are column-parallel, the output projection row-parallel. With sequence
parallelism the column-parallel projections all-gather the token shards and the output projection
reduce-scatters them back, so the attention itself always sees the full sequence for its local heads.
Cross-attention reads k/v from a context (text) that is replicated on every TP rank: those two
projections are built with sequence parallelism off.

Module and parameter names follow diffusers' attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``,
``norm_q``, ``norm_k``) so checkpoints map one to one and quantized linears carry diffusers names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_qvgen.models.common.linears import LinearSpecs, build_column, build_row, linear_out
from megatron_qvgen.models.common.megatron_config import without_sequence_parallel
from megatron_qvgen.models.common.rope import apply_rotary


class SDPACoreAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(d)) v for [s, b, heads, d] inputs -> [s, b, heads * d], in torch SDPA."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return out.permute(2, 0, 1, 3).flatten(2)


@dataclass
class AttentionSubmodules:
    """Swappable parts: the attention kernel and the q/k norms (None = no norm)."""

    core_attention: ModuleSpec
    q_norm: Optional[ModuleSpec] = None
    k_norm: Optional[ModuleSpec] = None


class ParallelAttention(MegatronModule):
    """Self-attention (``context_size=None``) or cross-attention to a replicated context."""

    def __init__(self, config, submodules: AttentionSubmodules, linears: LinearSpecs, *, num_heads: int,
                 head_dim: int, name: str, context_size: Optional[int] = None, norm_eps: float = 1e-6,
                 qkv_bias: bool = True):
        super().__init__(config)
        tp = config.tensor_model_parallel_size
        if num_heads % tp:
            raise ValueError(f"{name}: {num_heads} heads are not divisible by TP={tp}")
        self.is_cross_attention = context_size is not None
        self.local_heads = num_heads // tp
        self.head_dim = head_dim
        hidden = num_heads * head_dim
        kv_config = without_sequence_parallel(config) if self.is_cross_attention else config
        kv_in = context_size if self.is_cross_attention else hidden
        self.to_q = build_column(linears.column, hidden, hidden, name=f"{name}.to_q", config=config, bias=qkv_bias)
        self.to_k = build_column(linears.column, kv_in, hidden, name=f"{name}.to_k", config=kv_config, bias=qkv_bias)
        self.to_v = build_column(linears.column, kv_in, hidden, name=f"{name}.to_v", config=kv_config, bias=qkv_bias)
        # A list of one, like diffusers' to_out = [Linear, Dropout], so the name is "to_out.0".
        self.to_out = torch.nn.ModuleList(
            [build_row(linears.row, hidden, hidden, name=f"{name}.to_out.0", config=config)])
        self.norm_q = build_module(submodules.q_norm, hidden, norm_eps, config) if submodules.q_norm else None
        self.norm_k = build_module(submodules.k_norm, hidden, norm_eps, config) if submodules.k_norm else None
        self.core_attention = build_module(submodules.core_attention, config)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x: [s, b, h] (token-sharded under SP); context: [L, b, c]; rotary: (cos, sin) [s', d]."""
        if self.is_cross_attention != (context is not None):
            raise ValueError("cross-attention needs a context and self-attention must not get one")
        kv_source = context if self.is_cross_attention else x
        q = linear_out(self.to_q, x)
        k = linear_out(self.to_k, kv_source)
        v = linear_out(self.to_v, kv_source)
        if self.norm_q is not None:
            q = self.norm_q(q)
        if self.norm_k is not None:
            k = self.norm_k(k)
        q, k, v = (t.unflatten(-1, (self.local_heads, self.head_dim)) for t in (q, k, v))
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
        out = self.core_attention(q, k, v).to(x.dtype)
        return linear_out(self.to_out[0], out)
