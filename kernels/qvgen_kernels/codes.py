"""The integer codes of QVGen quantization: the one definition shared by training and deployment.

The fake quantizers in ``megatron_qvgen.quant`` call these functions (with a straight-through
round) and the inference runtime calls them (with ``torch.round``) or reproduces them op for op in
Triton, so a trained model and its export compute the same codes bit for bit.

Conventions, all arithmetic in float32 whatever the input dtype:
- codes are unsigned, ``0 .. 2**bits - 1``; rounding is half-to-even (``torch.round``);
- weights (LSQ+, per output channel): float zero point added BEFORE rounding,
  ``q = clamp(round(w / s + z), 0, qmax)``, ``w_hat = s * (q - z)``;
- activations (dynamic per token, learnable clip): integer zero point added AFTER rounding,
  ``lo = a_lo * (rowmin * c)``, ``hi = a_hi * (rowmax * c)``, ``s = max((hi - lo) / qmax, 1e-9)``,
  ``z = clamp(-round(lo / s), 0, qmax)``, ``q = clamp(round(x / s) + z, 0, qmax)``,
  ``x_hat = s * (q - z)``; ``a_lo``/``a_hi`` are sigmoids of the per-timestep-group clip logits;
- timestep group of a sampler/training timestep ``t``: ``floor(t) mod num_groups``;
- packing: two codes per byte along the input dimension, even index in the low nibble
  (3-bit codes use the same container).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

MIN_BITS, MAX_BITS = 2, 8
SCALE_EPS = 1e-9

RoundFn = Callable[[torch.Tensor], torch.Tensor]


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bit width must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def qmax(bits: int) -> int:
    """Largest unsigned code of a ``bits``-bit quantizer."""
    return 2 ** check_bits(bits) - 1


# ---------------------------------------------------------------- weights (per output channel)
def weight_qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """LSQ+ initial scale and float zero point of a clip range (``z`` is not rounded)."""
    scale = ((hi - lo) / qmax(bits)).clamp_min(SCALE_EPS)
    return scale, -lo / scale


def weight_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 round_fn: RoundFn = torch.round) -> torch.Tensor:
    """Integer codes (as float32 values) of weights ``w`` [out, in] with per-row ``scale``/``zero`` [out, 1]."""
    return torch.clamp(round_fn(w.float() / scale.float() + zero.float()), 0, qmax(bits))


def weight_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale.float() * (codes - zero.float())


# ---------------------------------------------------------------- activations (per token)
def act_clip_range(x: torch.Tensor, clip_ratio: float, clip_lo: torch.Tensor, clip_hi: torch.Tensor,
                   rowmin: torch.Tensor | None = None, rowmax: torch.Tensor | None = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clipped per-token range. ``clip_lo``/``clip_hi`` broadcast against [..., 1] (sigmoid of logits).

    ``rowmin``/``rowmax`` may be given when the row is sharded (reduced over tensor-parallel ranks).
    """
    xf = x.float()
    if rowmin is None:
        rowmin = xf.amin(dim=-1, keepdim=True)
    if rowmax is None:
        rowmax = xf.amax(dim=-1, keepdim=True)
    lo = clip_lo.float() * (rowmin * clip_ratio)
    hi = clip_hi.float() * (rowmax * clip_ratio)
    return lo, hi


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token scale and integer zero point; the zero point carries no gradient (plain round)."""
    scale = ((hi - lo) / qmax(bits)).clamp_min(SCALE_EPS)
    zero = torch.clamp(-torch.round(lo / scale), 0, qmax(bits))
    return scale, zero


def act_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
              round_fn: RoundFn = torch.round) -> torch.Tensor:
    return torch.clamp(round_fn(x.float() / scale) + zero, 0, qmax(bits))


def act_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


# ---------------------------------------------------------------- timestep groups
def timestep_group(timesteps: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Group index of each timestep (training index or sampler timestep value): floor(t) mod G."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    t = torch.as_tensor(timesteps)
    if t.is_floating_point():
        t = torch.floor(t)
    return torch.remainder(t.long(), num_groups)


# ---------------------------------------------------------------- packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [out, in] (values 0..2**bits-1, bits <= 4) two per byte along ``in`` -> uint8 [out, ceil(in/2)]."""
    if check_bits(bits) > 4:
        raise ValueError(f"only codes of at most 4 bits are packed two per byte, got {bits} bits")
    q = codes.to(torch.uint8)
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [out, ceil(in/2)] -> uint8 codes [out, in]."""
    low = packed & 0x0F
    high = packed >> 4
    out = torch.stack((low, high), dim=-1).flatten(-2)
    return out[..., :in_features]
