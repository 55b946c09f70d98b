"""Dynamic per-token activation quantizer with learnable clipping per timestep group (QVGEN.md).

Per token row: lo = sigmoid(lower[g]) * rowmin * c, hi = sigmoid(upper[g]) * rowmax * c with c = 0.95 and
g the sample's timestep group; codes from ``qvgen_kernels.codes``. The integer zero point carries no
gradient; the clip logits and the input get theirs through the straight-through round and the row range.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_qvgen.config import QuantConfig
from megatron_qvgen.quant.fake_quant import fake_quant_activation
from megatron_qvgen.quant.tp_reduce import sum_grad_over_group


class ActivationQuantizer(nn.Module):
    def __init__(self, quant: QuantConfig, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.bits = quant.act_bits
        self.clip_ratio = quant.act_clip_ratio
        self.num_groups = quant.num_timestep_groups
        logit = math.log(quant.act_clip_init / (1.0 - quant.act_clip_init))
        self.clip_lower = nn.Parameter(torch.full((self.num_groups,), logit, dtype=dtype, device=device))
        self.clip_upper = nn.Parameter(torch.full((self.num_groups,), logit, dtype=dtype, device=device))

    def clip_factors(self, groups: torch.Tensor, grad_group: Optional[dist.ProcessGroup] = None):
        """sigmoid of each sample's clip logits, shaped [batch, 1] to broadcast over (..., batch, hidden)."""
        lower = sum_grad_over_group(self.clip_lower, grad_group)
        upper = sum_grad_over_group(self.clip_upper, grad_group)
        groups = groups.to(lower.device)
        return (torch.sigmoid(lower.float())[groups].unsqueeze(-1),
                torch.sigmoid(upper.float())[groups].unsqueeze(-1))

    def forward(self, x: torch.Tensor, groups: torch.Tensor, row_group: Optional[dist.ProcessGroup] = None,
                grad_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        """``row_group``: TP group when each token's row is split across it (row-parallel input);
        ``grad_group``: TP group over which the clip logits' gradient must be summed."""
        a_lo, a_hi = self.clip_factors(groups, grad_group)
        return fake_quant_activation(x, a_lo, a_hi, self.clip_ratio, self.bits, row_group)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip_ratio={self.clip_ratio}, groups={self.num_groups}"
