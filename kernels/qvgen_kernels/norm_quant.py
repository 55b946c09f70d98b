"""LayerNorm (+ affine) (+ adaLN modulation) feeding quantized linears, in one pass that writes their codes.

What the runtime blocks compute before a quantized linear is ``h = (fp32 LayerNorm(x) * (1 + scale) + shift)`` in
float32, rounded to the activation dtype, then each consumer quantizes ``h`` per token with its own clip factors
(``codes.act_*``). :func:`norm_modulate_torch` is that definition; ``norm_quant_triton`` does the norm, the
modulation and the quantization for up to three consumers (Wan's q, k, v projections share one ``h``) in one kernel
that reads ``x`` and writes int8 codes, so neither the float32 intermediates nor ``h`` ever reach memory.

The codes are ``codes.act_*`` of the kernel's ``h`` bit for bit; ``h`` itself equals the torch definition up to the
summation order of the mean and variance (a float32 rounding, rarely visible after the bf16 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .act_quant import QuantizedActivations, quantize_per_token_torch


@dataclass
class ClipTarget:
    """One consumer of ``h``: its activation clip factors (per timestep group), clip ratio and bit width."""
    clip_lower: torch.Tensor
    clip_upper: torch.Tensor
    clip_ratio: float
    bits: int


@dataclass
class NormSpec:
    """LayerNorm over the last dimension with ``eps``, optional affine ``weight``/``bias`` [K], optional per-sample
    modulation ``shift``/``scale`` float32 [samples, K] (``h * (1 + scale) + shift``)."""
    eps: float
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None

    def __post_init__(self):
        if (self.weight is None) != (self.bias is None):
            raise ValueError("NormSpec needs both weight and bias, or neither")
        if (self.shift is None) != (self.scale is None):
            raise ValueError("NormSpec needs both shift and scale, or neither")
        for name in ("shift", "scale"):
            t = getattr(self, name)
            if t is not None and (t.dtype != torch.float32 or t.dim() != 2):
                raise ValueError(f"NormSpec.{name} must be float32 [samples, K], got {t.dtype} {list(t.shape)}")


def norm_modulate_torch(x: torch.Tensor, spec: NormSpec, rows_per_sample: int) -> torch.Tensor:
    """The definition: float32 LayerNorm, modulation, rounding to x's dtype, on [M, K] rows."""
    K = x.shape[-1]
    w = spec.weight.float() if spec.weight is not None else None
    b = spec.bias.float() if spec.bias is not None else None
    h = F.layer_norm(x.float(), (K,), w, b, spec.eps)
    if spec.scale is not None:
        scale, shift = (t.repeat_interleave(rows_per_sample, 0) for t in (spec.scale, spec.shift))
        h = h * (1 + scale) + shift
    return h.to(x.dtype)


def norm_quantize_torch(x: torch.Tensor, spec: NormSpec, targets: Sequence[ClipTarget], groups: torch.Tensor,
                        rows_per_sample: int) -> List[QuantizedActivations]:
    h = norm_modulate_torch(x, spec, rows_per_sample)
    return [quantize_per_token_torch(h, groups, rows_per_sample, t.clip_lower, t.clip_upper, t.clip_ratio, t.bits)
            for t in targets]


def norm_quantize(x: torch.Tensor, spec: NormSpec, targets: Sequence[ClipTarget], groups: torch.Tensor,
                  rows_per_sample: int, use_triton: bool) -> List[QuantizedActivations]:
    """Each target's codes of the normalized (and modulated) ``x`` [M, K]: the fused kernel, or the torch path."""
    if use_triton:
        from .norm_quant_triton import norm_quantize_triton
        return norm_quantize_triton(x, spec, targets, groups, rows_per_sample)
    return norm_quantize_torch(x, spec, targets, groups, rows_per_sample)
