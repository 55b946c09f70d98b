"""LSQ+ weight quantizer: per output channel, asymmetric, learnable step size and FLOAT zero point.

Initialised by the MSE clip search of the published implementation (QVGEN.md); trained with LSQ's
gradient scaling g = 1 / sqrt(in_features * qmax) on both step size and zero point. The codes themselves
come from ``qvgen_kernels.codes`` (the definition the inference runtime uses).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_qvgen.config import QuantConfig
from megatron_qvgen.quant.fake_quant import fake_quant_weight
from megatron_qvgen.quant.tp_reduce import all_reduce_sum, group_size, sum_grad_over_group
from qvgen_kernels import codes


class LSQPlusWeightQuantizer(nn.Module):
    def __init__(self, out_rows: int, in_features: int, quant: QuantConfig, device=None,
                 dtype: torch.dtype = torch.float32):
        """``out_rows``: output channels held by this rank; ``in_features``: the FULL input size.
        ``dtype``: the model's parameter dtype (bf16 training keeps fp32 masters in the optimizer, as the
        published runs do; the codes are always computed in float32 from these values)."""
        super().__init__()
        self.bits = quant.weight_bits
        self.in_features = in_features
        self.quant = quant
        self.scale = nn.Parameter(torch.ones(out_rows, 1, dtype=dtype, device=device))
        self.zero_point = nn.Parameter(torch.zeros(out_rows, 1, dtype=dtype, device=device))
        self.grad_factor = (1.0 / math.sqrt(in_features * codes.qmax(self.bits))) if quant.lsq_grad_scaling else 1.0

    def forward(self, weight: torch.Tensor, replicated_group: Optional[dist.ProcessGroup] = None,
                aux_l: Optional[torch.Tensor] = None, aux_r: Optional[torch.Tensor] = None,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``Qw(W) [+ aux_l @ aux_r]`` (float32 unless ``out_dtype``). ``replicated_group``: TP group when
        scale/zero are replicated but each rank holds part of their row (row-parallel): their gradients
        are summed over it."""
        scale = sum_grad_over_group(self.scale, replicated_group)
        zero = sum_grad_over_group(self.zero_point, replicated_group)
        return fake_quant_weight(weight, scale, zero, self.bits, self.grad_factor, aux_l, aux_r, out_dtype)

    @torch.no_grad()
    def quantize_exact(self, weight: torch.Tensor) -> torch.Tensor:
        """Q(W) without autograd (initialisation, export checks)."""
        scale, zero = self.scale.float(), self.zero_point.float()
        return codes.weight_dequant(codes.weight_codes(weight, scale, zero, self.bits), scale, zero)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor, row_group: Optional[dist.ProcessGroup] = None) -> None:
        """MSE clip search per output channel. ``row_group``: the TP group when rows are split across it."""
        w = weight.detach().float()
        rmin = w.amin(dim=1, keepdim=True)
        rmax = w.amax(dim=1, keepdim=True)
        if group_size(row_group) > 1:
            dist.all_reduce(rmin, op=dist.ReduceOp.MIN, group=row_group)
            dist.all_reduce(rmax, op=dist.ReduceOp.MAX, group=row_group)
        q = self.quant
        if q.weight_init == "minmax":
            candidates = [1.0]
        else:
            candidates = [1.0 - i / q.mse_grid for i in range(int(q.mse_max_shrink * q.mse_grid))]
        errors = torch.empty(len(candidates), w.shape[0], dtype=torch.float64, device=w.device)
        for i, p in enumerate(candidates):
            s, z = codes.weight_qparams_from_range(p * rmin, p * rmax, self.bits)
            deq = codes.weight_dequant(codes.weight_codes(w, s, z, self.bits), s, z)
            # float64 sums: the argmin must not depend on how the row is split across ranks.
            errors[i] = (deq - w).abs().double().pow(q.mse_norm).sum(dim=1)
        all_reduce_sum(errors, row_group)
        if not torch.isfinite(errors).all():
            raise FloatingPointError("non-finite error in the weight quantizer's MSE clip search (NaN/inf weights?)")
        best = errors.argmin(dim=0)  # first minimum: ties keep the wider clip, as the reference does
        p_best = torch.tensor(candidates, dtype=torch.float32, device=w.device)[best].unsqueeze(1)
        s, z = codes.weight_qparams_from_range(p_best * rmin, p_best * rmax, self.bits)
        self.scale.copy_(s)
        self.zero_point.copy_(z)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, rows={self.scale.shape[0]}, in_features={self.in_features}"
