"""What a rank-decay boundary does to the Adam moments of L and R (``quant.decay_moments``).

A boundary re-factors the kept factors, L' = L_k T_L and R' = T_R R_k with L' R' = L_k R_k, so the old moments
describe gradients in a basis that no longer exists. The gradients of the new factors are linear in the old ones,
dJ/dL' = (dJ/dL_k) T_R^T and dJ/dR' = T_L^T (dJ/dR_k), which gives three honest choices:

- ``reset``: both moments start from zero (Adam restarts for L and R; the step count is shared and kept);
- ``realign``: the first moment carried through those maps (exact), the second through the maps squared
  element-wise (exact when the gradient's columns of L, rows of R, are uncorrelated; otherwise an estimate that
  stays non-negative);
- ``keep``: the kept columns' moments left as they were, in the old basis: what the published implementation's
  optimizer ends up with (QVGEN.md), kept to measure whether it matters.

Dropped columns (rows of R) get zero moments in every case: their storage stays r0 wide until rank 0.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from megatron_qvgen.config.quant import DECAY_MOMENTS

MomentRemap = Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]


def boundary_moment_remap(policy: str, grad_map: torch.Tensor, rank: int, left: bool) -> Optional[MomentRemap]:
    """The map from a factor's whole moments (``{name: tensor shaped like the factor}``) to its new ones, or None
    for ``reset``. ``grad_map``: the k x k matrix G with grad(new) = grad(old) G for L (``left``) and G grad(old)
    for R, i.e. T_R^T for L and T_L^T for R; ``rank``: k, the columns (rows of R) kept."""
    if policy not in DECAY_MOMENTS:
        raise ValueError(f"quant.decay_moments must be one of {DECAY_MOMENTS}, got {policy!r}")
    if policy == "reset":
        return None

    def remap(moments: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: _moved(policy, name, m, grad_map, rank, left) for name, m in moments.items()}

    return remap


def _moved(policy: str, name: str, moment: torch.Tensor, grad_map: torch.Tensor, rank: int,
           left: bool) -> torch.Tensor:
    out = torch.zeros_like(moment)
    kept = moment[:, :rank] if left else moment[:rank]
    if policy == "realign":
        # second moments (exp_avg_sq, amsgrad's max_exp_avg_sq) are means of squares: the squared map
        g = grad_map.double().square() if name.endswith("_sq") else grad_map.double()
        kept = (kept.double() @ g if left else g @ kept.double()).to(moment.dtype)
    if left:
        out[:, :rank] = kept
    else:
        out[:rank] = kept
    return out
