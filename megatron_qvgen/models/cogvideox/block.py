"""One CogVideoX block on the joint [text; video] sequence ([s, b, h], token-sharded under SP).

diffusers keeps text and video in two tensors and concatenates them for attention and the FFN; here they
stay one sequence (text first), so the attention, the FFN and sequence parallelism see one tensor, and
only the adaLN modulation treats the two streams apart: ``norm1`` / ``norm2`` (diffusers'
``CogVideoXLayerNormZero``) give shift, scale and gate for video and for text from the time embedding,
applied to this rank's text tokens (the first ``text_tokens`` of its slice) and video tokens
respectively. Arithmetic in the activation dtype, in diffusers' order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_qvgen.config import CogVideoXConfig
from megatron_qvgen.models.cogvideox.spec import CogVideoXBlockSubmodules
from megatron_qvgen.models.common.adaln import build_modulation_projection, conditioning_for_tokens, gated, modulate
from megatron_qvgen.models.common.attention import ParallelAttention
from megatron_qvgen.models.common.feedforward import ParallelFeedForward
from megatron_qvgen.models.common.linears import LinearSpecs, linear_out
from megatron_qvgen.models.common.norms import FP32LayerNorm

QK_NORM_EPS = 1e-6  # diffusers builds CogVideoX's attention with eps=1e-6 whatever norm_eps is


@dataclass(frozen=True)
class JointLayout:
    """Where the streams are in this rank's slice of the joint sequence, and the video tokens' rotary."""

    text_tokens: int                                        # leading text tokens of the local slice
    rotary: Optional[Tuple[torch.Tensor, torch.Tensor]]     # cos, sin of all video tokens (5B), or None


def per_stream(x: torch.Tensor, text_tokens: int, on_text, on_video) -> torch.Tensor:
    """Apply ``on_text`` to the leading text tokens of x [s, b, h] and ``on_video`` to the rest."""
    if text_tokens == 0:
        return on_video(x)
    if text_tokens == x.shape[0]:
        return on_text(x)
    return torch.cat([on_text(x[:text_tokens]), on_video(x[text_tokens:])], dim=0)


class AdaLayerNormZero(MegatronModule):
    """diffusers' ``CogVideoXLayerNormZero``: one LayerNorm, modulated per stream; returns the gates."""

    NUM_VECTORS = 6  # shift, scale, gate of the video tokens, then of the text tokens

    def __init__(self, config, linears: LinearSpecs, conditioning_size: int, hidden_size: int, eps: float, *,
                 name: str):
        super().__init__(config)
        self.linear = build_modulation_projection(linears, conditioning_size, self.NUM_VECTORS, hidden_size,
                                                  name=f"{name}.linear", config=config)
        self.norm = FP32LayerNorm(hidden_size, eps, True, config)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_tokens: int):
        mod = linear_out(self.linear, F.silu(temb)).unflatten(-1, (self.NUM_VECTORS, -1))
        shift, scale, gate, text_shift, text_scale, text_gate = \
            conditioning_for_tokens(mod, self.config.sequence_parallel).unbind(1)
        out = per_stream(self.norm(x), text_tokens, lambda t: modulate(t, text_shift, text_scale),
                         lambda v: modulate(v, shift, scale))
        return out, (gate, text_gate)


def gated_update(update: torch.Tensor, gates, text_tokens: int) -> torch.Tensor:
    video_gate, text_gate = gates
    return per_stream(update, text_tokens, lambda t: gated(t, text_gate), lambda v: gated(v, video_gate))


class CogVideoXBlock(MegatronModule):
    def __init__(self, config, submodules: CogVideoXBlockSubmodules, *, model_cfg: CogVideoXConfig,
                 layer_number: int):
        super().__init__(config)
        h, eps, temb = model_cfg.hidden_size, model_cfg.norm_eps, model_cfg.time_embed_dim
        name = f"transformer_blocks.{layer_number}"
        linears = submodules.linears
        self.layer_number = layer_number
        self.norm1 = AdaLayerNormZero(config, linears, temb, h, eps, name=f"{name}.norm1")
        self.attn1 = ParallelAttention(config, submodules.attention, linears,
                                       num_heads=model_cfg.num_attention_heads,
                                       head_dim=model_cfg.attention_head_dim, name=f"{name}.attn1",
                                       norm_eps=QK_NORM_EPS, qkv_bias=model_cfg.attention_bias)
        self.norm2 = AdaLayerNormZero(config, linears, temb, h, eps, name=f"{name}.norm2")
        self.ff = ParallelFeedForward(config, linears, hidden_size=h, ffn_dim=model_cfg.ffn_dim, name=f"{name}.ff",
                                      activation="gelu_tanh")

    def forward(self, x: torch.Tensor, temb: torch.Tensor, layout: JointLayout) -> torch.Tensor:
        attn_in, gates = self.norm1(x, temb, layout.text_tokens)
        x = x + gated_update(self.attn1(attn_in, rotary=layout.rotary), gates, layout.text_tokens)
        ff_in, gates = self.norm2(x, temb, layout.text_tokens)
        return x + gated_update(self.ff(ff_in), gates, layout.text_tokens)
