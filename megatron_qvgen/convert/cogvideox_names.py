"""CogVideoX 1.0 (diffusers ``CogVideoXTransformer3DModel``, text-to-video) <-> megatron checkpoint keys.

Our megatron modules are named like diffusers' (``transformer_blocks.{i}.attn1.to_out.0``,
``norm1.linear``, ``patch_embed.text_proj``, ...), so every key maps to itself; the table lists each
parameter with its shape so conversions are checked completely. The 2B model's sin-cos table is a
non-persistent buffer in diffusers (recomputed here), so it is not a checkpoint key. No tensor is
transformed: a round trip is bit-identical.
"""
from __future__ import annotations

from megatron_qvgen.convert.mapping import ParamRule, ParamTable


def _same(name: str, shape, when=None) -> ParamRule:
    return ParamRule(megatron=name, diffusers=name, shape=shape, when=when)


def _h(c):
    return c.hidden_size


def _t(c):
    return c.time_embed_dim


_RULES = [
    _same("patch_embed.proj.weight", lambda c: (_h(c), c.in_channels, c.patch_size, c.patch_size)),
    _same("patch_embed.proj.bias", lambda c: (_h(c),), when=lambda c: c.patch_bias),
    _same("patch_embed.text_proj.weight", lambda c: (_h(c), c.text_embed_dim)),
    _same("patch_embed.text_proj.bias", lambda c: (_h(c),)),
    _same("time_embedding.linear_1.weight", lambda c: (_t(c), _h(c))),
    _same("time_embedding.linear_1.bias", lambda c: (_t(c),)),
    _same("time_embedding.linear_2.weight", lambda c: (_t(c), _t(c))),
    _same("time_embedding.linear_2.bias", lambda c: (_t(c),)),
]
for _norm in ("norm1", "norm2"):  # CogVideoXLayerNormZero: 6 modulation vectors and one LayerNorm
    _RULES += [
        _same(f"transformer_blocks.{{i}}.{_norm}.linear.weight", lambda c: (6 * _h(c), _t(c))),
        _same(f"transformer_blocks.{{i}}.{_norm}.linear.bias", lambda c: (6 * _h(c),)),
        _same(f"transformer_blocks.{{i}}.{_norm}.norm.weight", lambda c: (_h(c),)),
        _same(f"transformer_blocks.{{i}}.{_norm}.norm.bias", lambda c: (_h(c),)),
    ]
for _proj in ("to_q", "to_k", "to_v", "to_out.0"):
    _RULES.append(_same(f"transformer_blocks.{{i}}.attn1.{_proj}.weight", lambda c: (_h(c), _h(c))))
    _RULES.append(_same(f"transformer_blocks.{{i}}.attn1.{_proj}.bias", lambda c: (_h(c),),
                        when=None if _proj == "to_out.0" else (lambda c: c.attention_bias)))
for _norm in ("norm_q", "norm_k"):  # per-head LayerNorm: one affine of head size
    for _param in ("weight", "bias"):
        _RULES.append(_same(f"transformer_blocks.{{i}}.attn1.{_norm}.{_param}", lambda c: (c.attention_head_dim,)))
_RULES += [
    _same("transformer_blocks.{i}.ff.net.0.proj.weight", lambda c: (c.ffn_dim, _h(c))),
    _same("transformer_blocks.{i}.ff.net.0.proj.bias", lambda c: (c.ffn_dim,)),
    _same("transformer_blocks.{i}.ff.net.2.weight", lambda c: (_h(c), c.ffn_dim)),
    _same("transformer_blocks.{i}.ff.net.2.bias", lambda c: (_h(c),)),
    _same("norm_final.weight", lambda c: (_h(c),)),
    _same("norm_final.bias", lambda c: (_h(c),)),
    _same("norm_out.linear.weight", lambda c: (2 * _h(c), _t(c))),
    _same("norm_out.linear.bias", lambda c: (2 * _h(c),)),
    _same("norm_out.norm.weight", lambda c: (_h(c),)),
    _same("norm_out.norm.bias", lambda c: (_h(c),)),
    _same("proj_out.weight", lambda c: (c.out_channels * c.patch_size ** 2, _h(c))),
    _same("proj_out.bias", lambda c: (c.out_channels * c.patch_size ** 2,)),
]

COGVIDEOX_TABLE = ParamTable("cogvideox", _RULES)
