"""Float64 oracle of the quantized GEMM: dequantize both operands exactly and multiply in float64.

Deliberately the plain form ``(s_a (qa - z_a)) @ (s_w (qw - z_w)).T + b``, not the rank-1-corrected
integer form the kernels use, so that it checks their algebra as well as their arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import codes
from .act_quant import QuantizedActivations
from .qgemm import PackedWeight


def dequant_matmul_float64(act: QuantizedActivations, weight: PackedWeight,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    x_hat = act.scale.double()[:, None] * (act.codes.double() - act.zero.double()[:, None])
    qw = codes.unpack_codes(weight.packed, weight.in_features).double().to(x_hat.device)
    w_hat = weight.scale.double()[:, None] * (qw - weight.zero.double()[:, None])
    y = x_hat @ w_hat.T
    if bias is not None:
        y = y + bias.double()[None, :]
    return y
