"""Per-token activation quantization for the runtime: the result type and the torch path (``codes.py``).

The Triton kernel in ``act_quant_triton`` computes exactly what :func:`quantize_per_token_torch` computes;
both return :class:`QuantizedActivations`, the operand of the quantized GEMM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from . import codes


@dataclass
class QuantizedActivations:
    """Per-token codes of a [M, K] activation and what the GEMM epilogue needs.

    ``codes`` int8 [M, K] (values 0..2**bits-1; int8 so that they feed 8-bit tensor cores directly);
    ``scale`` float32 [M]; ``zero`` float32 [M] (integer-valued); ``rowsum`` int32 [M] (sum of codes).
    """
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    rowsum: torch.Tensor
    bits: int


def clip_factors_per_row(groups: torch.Tensor, rows_per_sample: int, num_rows: int, clip_lower: torch.Tensor,
                         clip_upper: torch.Tensor):
    """[M, 1] lower/upper clip factors: row r belongs to sample r // rows_per_sample, whose group picks them."""
    sample = torch.arange(num_rows, device=groups.device) // rows_per_sample
    g = groups.long()[sample]
    return clip_lower.float()[g].unsqueeze(-1), clip_upper.float()[g].unsqueeze(-1)


def check_groups(groups: torch.Tensor, num_rows: int, rows_per_sample: int) -> None:
    if rows_per_sample < 1 or num_rows % rows_per_sample:
        raise ValueError(f"{num_rows} activation rows do not split into samples of {rows_per_sample} rows")
    if groups.numel() != num_rows // rows_per_sample:
        raise ValueError(f"got {groups.numel()} timestep groups for {num_rows // rows_per_sample} samples")


def quantize_per_token_torch(x: torch.Tensor, groups: torch.Tensor, rows_per_sample: int, clip_lower: torch.Tensor,
                             clip_upper: torch.Tensor, clip_ratio: float, bits: int) -> QuantizedActivations:
    """Reference path: ``codes.act_clip_range`` / ``act_qparams`` / ``act_codes`` on a [M, K] input."""
    if x.dim() != 2:
        raise ValueError(f"expected a [tokens, features] input, got shape {tuple(x.shape)}")
    check_groups(groups, x.shape[0], rows_per_sample)
    a_lo, a_hi = clip_factors_per_row(groups.to(x.device), rows_per_sample, x.shape[0],
                                      clip_lower.to(x.device), clip_upper.to(x.device))
    xf = x.float()
    lo, hi = codes.act_clip_range(xf, clip_ratio, a_lo, a_hi)
    scale, zero = codes.act_qparams(lo, hi, bits)
    q = codes.act_codes(xf, scale, zero, bits)
    return QuantizedActivations(codes=q.to(torch.int8 if bits <= 7 else torch.uint8), scale=scale.reshape(-1),
                                zero=zero.reshape(-1), rowsum=q.to(torch.int32).sum(dim=-1, dtype=torch.int32),
                                bits=bits)


# A few float32 values whose quotient by 15 differs from their product with float32(1/15).
_PROBE = np.random.default_rng(0).uniform(1.0, 2.0, 64).astype(np.float32)


@functools.lru_cache(maxsize=None)
def scalar_division_uses_reciprocal(device_type: str) -> bool:
    """Whether torch computes ``tensor / python_scalar`` as a product with the float32 reciprocal on this device.

    ``codes.act_qparams`` divides by the Python int ``qmax``: torch's CPU kernel divides, its CUDA kernel
    multiplies by the reciprocal (they differ in the last bit for most inputs). The Triton kernel mirrors
    whichever torch does on the device it runs on, so its scales and codes match ``codes.py`` bit for bit.
    """
    divisor = np.float32(15)
    true_div = _PROBE / divisor
    recip = _PROBE * (np.float32(1) / divisor)
    got = (torch.from_numpy(_PROBE).to(device_type) / 15).cpu().numpy()
    if np.array_equal(got, recip):
        return True
    if np.array_equal(got, true_div):
        return False
    raise RuntimeError(f"torch's scalar division on {device_type} is neither a true division nor a reciprocal "
                       "product: the runtime cannot reproduce codes.act_qparams bit for bit")
