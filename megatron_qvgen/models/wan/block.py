"""One Wan 2.1 transformer block, on [s, b, h] activations (token-sharded under sequence parallelism).

self-attention (q/k RMSNorm over all heads, 3D RoPE) -> cross-attention to the projected text ->
GELU-tanh FFN, with adaLN shift/scale/gate from the block's ``scale_shift_table`` plus the time
projection. Residual arithmetic follows diffusers' (fp32 modulation and residual adds).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_qvgen.config import WanConfig
from megatron_qvgen.models.common.adaln import conditioning_for_tokens, gated, modulate
from megatron_qvgen.models.common.attention import ParallelAttention
from megatron_qvgen.models.common.feedforward import ParallelFeedForward
from megatron_qvgen.models.common.norms import FP32LayerNorm
from megatron_qvgen.models.wan.conditioning import WanConditioning
from megatron_qvgen.models.wan.spec import WanBlockSubmodules


class WanTransformerBlock(MegatronModule):
    def __init__(self, config, submodules: WanBlockSubmodules, *, model_cfg: WanConfig, layer_number: int):
        super().__init__(config)
        h, eps = model_cfg.hidden_size, model_cfg.eps
        heads, head_dim = model_cfg.num_attention_heads, model_cfg.attention_head_dim
        name = f"blocks.{layer_number}"
        linears = submodules.linears
        self.layer_number = layer_number
        self.norm1 = FP32LayerNorm(h, eps, False, config)
        self.attn1 = ParallelAttention(config, submodules.self_attention, linears, num_heads=heads,
                                       head_dim=head_dim, name=f"{name}.attn1", norm_eps=eps)
        self.attn2 = ParallelAttention(config, submodules.cross_attention, linears, num_heads=heads,
                                       head_dim=head_dim, name=f"{name}.attn2", context_size=h, norm_eps=eps)
        self.norm2 = FP32LayerNorm(h, eps, True, config) if model_cfg.cross_attn_norm else None
        self.ffn = ParallelFeedForward(config, linears, hidden_size=h, ffn_dim=model_cfg.ffn_dim,
                                       name=f"{name}.ffn", activation="gelu_tanh")
        self.norm3 = FP32LayerNorm(h, eps, False, config)
        self.scale_shift_table = torch.nn.Parameter(
            torch.randn(1, 6, h, dtype=config.params_dtype) / h ** 0.5)

    def forward(self, x: torch.Tensor, cond: WanConditioning) -> torch.Tensor:
        mod = self.scale_shift_table.float() + cond.timestep_proj.float()  # [b, 6, h]
        mod = conditioning_for_tokens(mod, self.config.sequence_parallel)
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(1)

        attn_in = modulate(self.norm1(x.float()), shift, scale).type_as(x)
        x = (x.float() + gated(self.attn1(attn_in, rotary=cond.rotary), gate)).type_as(x)

        cross_in = self.norm2(x.float()).type_as(x) if self.norm2 is not None else x
        x = x + self.attn2(cross_in, context=cond.context)

        ffn_in = modulate(self.norm3(x.float()), c_shift, c_scale).type_as(x)
        return (x.float() + gated(self.ffn(ffn_in).float(), c_gate)).type_as(x)
