"""The quantized GEMM's integer math, its weight operand, and the torch path for machines without a GPU.

For activation codes ``qa`` (per-token scale ``s_a``, integer zero ``z_a``) and weight codes ``qw``
(per-output-channel scale ``s_w``, float zero ``z_w``), ``x_hat @ w_hat.T`` is

    y = s_a * s_w * (sum_k qa*qw - z_w * sum_k qa - z_a * sum_k qw + K * z_a * z_w)
      = s_a * s_w * (I1 - z_w * I2),  I1 = sum_k qa*qw - z_a * colsum(qw),  I2 = rowsum(qa) - K * z_a,

where I1 and I2 are exact integers (z_a is an integer). Both the Triton kernel and :func:`quant_matmul_torch`
evaluate the second form: the only rounding is in three float32 operations of the epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import codes
from .act_quant import QuantizedActivations

# fp32 sums of integer products are exact while every partial sum stays below 2**24.
_FP32_EXACT_LIMIT = 2 ** 24


EPILOGUES = ("gelu_tanh", "residual")


@dataclass
class Epilogue:
    """What the model does with a linear's output before anything else reads it, fused into the GEMM's epilogue.

    ``"gelu_tanh"``: ``F.gelu(y, approximate="tanh")`` on the output in its dtype.
    ``"residual"``: ``(residual.float() + y.float() * gate).to(residual.dtype)`` with the gate of the row's sample
    (``gate`` float32 [samples, N], row r in sample r // rows_per_sample), or ``residual + y`` without a gate:
    the gated residual updates of Wan's blocks. :func:`apply_epilogue_torch` is the definition; the fused Triton
    epilogue rounds the GEMM result to the output dtype first and then does the same float32 operations, so the
    residual form is bit-identical to it.
    """
    kind: str
    residual: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None
    rows_per_sample: int = 1

    def __post_init__(self):
        if self.kind not in EPILOGUES:
            raise ValueError(f"Epilogue.kind must be one of {EPILOGUES}, got {self.kind!r}")
        if self.kind == "residual" and self.residual is None:
            raise ValueError("a residual epilogue needs its residual tensor")
        if self.gate is not None and (self.gate.dtype != torch.float32 or self.gate.dim() != 2):
            raise ValueError(f"the gate must be float32 [samples, N], got {self.gate.dtype} {list(self.gate.shape)}")

    def check(self, M: int, N: int) -> None:
        if self.residual is not None and tuple(self.residual.shape) != (M, N):
            raise ValueError(f"residual must be [{M}, {N}], got {list(self.residual.shape)}")
        if self.gate is not None and (self.gate.shape[1] != N or self.gate.shape[0] * self.rows_per_sample != M):
            raise ValueError(f"gate {list(self.gate.shape)} with {self.rows_per_sample} rows a sample does not cover "
                             f"[{M}, {N}]")


def apply_epilogue_torch(y: torch.Tensor, epilogue: Optional[Epilogue]) -> torch.Tensor:
    """The unfused definition of :class:`Epilogue` on a [M, N] linear output."""
    if epilogue is None:
        return y
    epilogue.check(*y.shape)
    if epilogue.kind == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    res = epilogue.residual
    if epilogue.gate is None:
        return res + y.to(res.dtype)
    gate = epilogue.gate.repeat_interleave(epilogue.rows_per_sample, dim=0)
    return (res.float() + y.float() * gate).to(res.dtype)


@dataclass
class PackedWeight:
    """The weight operand: packed codes (two a byte along K), scale, float zero point and column sums."""
    packed: torch.Tensor    # uint8 [N, ceil(K / 2)]
    scale: torch.Tensor     # float32 [N]
    zero: torch.Tensor      # float32 [N]
    colsum: torch.Tensor    # int32 [N], sum over K of the codes
    in_features: int
    bits: int

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int,
                    bits: int) -> "PackedWeight":
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (in_features + 1) // 2:
            raise ValueError(f"packed weight codes must be uint8 [out, ceil({in_features} / 2)], "
                             f"got {packed.dtype} {list(packed.shape)}")
        colsum = codes.unpack_codes(packed, in_features).sum(dim=1, dtype=torch.int32)
        return cls(packed=packed.contiguous(), scale=scale.float().reshape(-1).contiguous(),
                   zero=zero.float().reshape(-1).contiguous(), colsum=colsum, in_features=in_features,
                   bits=codes.check_bits(bits))

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def unpacked(self, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        """Codes [N, K] in ``dtype`` (torch ops; the Triton runtime uses ``qgemm_triton.unpack_weight``)."""
        return codes.unpack_codes(self.packed, self.in_features).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero, self.colsum))


def quant_matmul_torch(act: QuantizedActivations, weight: PackedWeight, bias: Optional[torch.Tensor] = None,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Exact integer math in torch ops: ``I1`` by an fp32 matmul of small integers (exact), fp32 epilogue."""
    K = weight.in_features
    if act.codes.shape[1] != K:
        raise ValueError(f"activation has {act.codes.shape[1]} features, weight expects {K}")
    top_a, top_w = codes.qmax(act.bits), codes.qmax(weight.bits)
    centered = act.codes.float() - act.zero[:, None]          # qa - z_a, integers in [-qmax, qmax]
    qw = weight.unpacked(torch.float32).to(centered.device)
    exact_dtype = torch.float32 if top_a * top_w * K < _FP32_EXACT_LIMIT else torch.float64
    i1 = (centered.to(exact_dtype) @ qw.to(exact_dtype).T).float()    # = sum qa*qw - z_a * colsum
    i2 = (act.rowsum - K * act.zero.to(torch.int32)).float()
    s = act.scale[:, None] * weight.scale[None, :]
    y = s * (i1 - weight.zero[None, :] * i2[:, None])
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)
