"""Wan 2.1 (diffusers ``WanTransformer3DModel``, text-to-video) <-> megatron checkpoint keys.

Our megatron modules are named like diffusers' (``blocks.{i}.attn1.to_out.0``, ``ffn.net.0.proj``, ...),
so every key maps to itself; the table still lists each parameter with its shape so conversions are
checked completely. No tensor is transformed: a round trip is bit-identical.
"""
from __future__ import annotations

import math

from megatron_qvgen.convert.mapping import ParamRule, ParamTable


def _same(name: str, shape, when=None) -> ParamRule:
    return ParamRule(megatron=name, diffusers=name, shape=shape, when=when)


def _h(c):
    return c.hidden_size


_RULES = [
    _same("patch_embedding.weight", lambda c: (_h(c), c.in_channels, *c.patch_size)),
    _same("patch_embedding.bias", lambda c: (_h(c),)),
    _same("condition_embedder.time_embedder.linear_1.weight", lambda c: (_h(c), c.freq_dim)),
    _same("condition_embedder.time_embedder.linear_1.bias", lambda c: (_h(c),)),
    _same("condition_embedder.time_embedder.linear_2.weight", lambda c: (_h(c), _h(c))),
    _same("condition_embedder.time_embedder.linear_2.bias", lambda c: (_h(c),)),
    _same("condition_embedder.time_proj.weight", lambda c: (6 * _h(c), _h(c))),
    _same("condition_embedder.time_proj.bias", lambda c: (6 * _h(c),)),
    _same("condition_embedder.text_embedder.linear_1.weight", lambda c: (_h(c), c.text_dim)),
    _same("condition_embedder.text_embedder.linear_1.bias", lambda c: (_h(c),)),
    _same("condition_embedder.text_embedder.linear_2.weight", lambda c: (_h(c), _h(c))),
    _same("condition_embedder.text_embedder.linear_2.bias", lambda c: (_h(c),)),
    _same("blocks.{i}.scale_shift_table", lambda c: (1, 6, _h(c))),
]
for _attn in ("attn1", "attn2"):
    for _proj in ("to_q", "to_k", "to_v", "to_out.0"):
        _RULES.append(_same(f"blocks.{{i}}.{_attn}.{_proj}.weight", lambda c: (_h(c), _h(c))))
        _RULES.append(_same(f"blocks.{{i}}.{_attn}.{_proj}.bias", lambda c: (_h(c),)))
    for _norm in ("norm_q", "norm_k"):
        _RULES.append(_same(f"blocks.{{i}}.{_attn}.{_norm}.weight", lambda c: (_h(c),)))
_RULES += [
    _same("blocks.{i}.norm2.weight", lambda c: (_h(c),), when=lambda c: c.cross_attn_norm),
    _same("blocks.{i}.norm2.bias", lambda c: (_h(c),), when=lambda c: c.cross_attn_norm),
    _same("blocks.{i}.ffn.net.0.proj.weight", lambda c: (c.ffn_dim, _h(c))),
    _same("blocks.{i}.ffn.net.0.proj.bias", lambda c: (c.ffn_dim,)),
    _same("blocks.{i}.ffn.net.2.weight", lambda c: (_h(c), c.ffn_dim)),
    _same("blocks.{i}.ffn.net.2.bias", lambda c: (_h(c),)),
    _same("proj_out.weight", lambda c: (c.out_channels * math.prod(c.patch_size), _h(c))),
    _same("proj_out.bias", lambda c: (c.out_channels * math.prod(c.patch_size),)),
    _same("scale_shift_table", lambda c: (1, 2, _h(c))),
]

WAN_TABLE = ParamTable("wan", _RULES)
