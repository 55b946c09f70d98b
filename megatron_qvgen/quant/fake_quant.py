"""Fake quantisation (quantise-dequantise with straight-through gradients): the reference PyTorch path.

These two functions are the single entry point of the quantizers; a fused GPU implementation
(``fused_fake_quant``) may replace them for CUDA tensors but must produce the same codes (forward
bit-identical) and the same gradients up to float rounding. The integer codes come from
``qvgen_kernels.codes``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_qvgen.quant.ste import round_ste, scale_grad
from megatron_qvgen.quant.tp_reduce import row_max, row_min
from qvgen_kernels import codes


def fake_quant_activation_reference(x: torch.Tensor, a_lo: torch.Tensor, a_hi: torch.Tensor, clip_ratio: float,
                                    bits: int, row_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token fake quantisation of ``x`` (..., batch, hidden); ``a_lo``/``a_hi`` [batch, 1] clip factors.

    ``row_group``: TP group over which each token's row is split (the range is reduced over it)."""
    xf = x.float()
    lo, hi = codes.act_clip_range(xf, clip_ratio, a_lo, a_hi, rowmin=row_min(xf, row_group), rowmax=row_max(xf, row_group))
    scale, zero = codes.act_qparams(lo, hi, bits)
    q = codes.act_codes(xf, scale, zero, bits, round_fn=round_ste)
    return codes.act_dequant(q, scale, zero).to(x.dtype)


def fake_quant_weight_reference(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                                grad_factor: float, aux_l: Optional[torch.Tensor] = None,
                                aux_r: Optional[torch.Tensor] = None,
                                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Effective weight ``Qw(W) + aux_l @ aux_r`` (LSQ+, per-row ``scale``/``zero`` [out, 1]).

    ``aux_l`` [out, r] already carries the rank-decay gamma; the sum is formed in float32 and returned in
    ``out_dtype`` (default float32)."""
    # one cast each: the two nearly cancelling halves of the LSQ+ gradient must meet in float32, not bf16
    scale = scale_grad(scale, grad_factor).float()
    zero = scale_grad(zero, grad_factor).float()
    q = codes.weight_codes(weight, scale, zero, bits, round_fn=round_ste)
    w = codes.weight_dequant(q, scale, zero)
    if aux_l is not None:
        w = w + aux_l.float() @ aux_r.float()
    return w if out_dtype is None else w.to(out_dtype)


def fake_quant_activation(x, a_lo, a_hi, clip_ratio, bits, row_group=None):
    if x.is_cuda and not (_MODE == "fused-tp1" and row_group is not None and dist.get_world_size(row_group) > 1):
        fused = _fused()
        if fused is not None:
            return fused.fake_quant_activation(x, a_lo, a_hi, clip_ratio, bits, row_group)
    return fake_quant_activation_reference(x, a_lo, a_hi, clip_ratio, bits, row_group)


def fake_quant_weight(weight, scale, zero, bits, grad_factor, aux_l=None, aux_r=None, out_dtype=None):
    if weight.is_cuda:
        fused = _fused()
        if fused is not None:
            return fused.fake_quant_weight(weight, scale, zero, bits, grad_factor, aux_l, aux_r, out_dtype)
    return fake_quant_weight_reference(weight, scale, zero, bits, grad_factor, aux_l, aux_r, out_dtype)


_FUSED = None
# QVGEN_FAKE_QUANT: "fused" (default: Triton on CUDA), "reference" (always the torch path), or "fused-tp1"
# (Triton except where a row is split over tensor-parallel ranks). For debugging and A/B timing.
_MODE = os.environ.get("QVGEN_FAKE_QUANT", "fused")
if _MODE not in ("fused", "reference", "fused-tp1"):
    raise ValueError(f"QVGEN_FAKE_QUANT must be fused, reference or fused-tp1, got {_MODE!r}")


def _fused():
    """The Triton implementation when it exists and Triton imports; None otherwise (torch path)."""
    global _FUSED
    if _MODE == "reference":
        return None
    if _FUSED is None:
        try:
            from megatron_qvgen.quant import fused_fake_quant  # noqa: PLC0415

            _FUSED = fused_fake_quant
        except ImportError:
            _FUSED = False
    return _FUSED or None
