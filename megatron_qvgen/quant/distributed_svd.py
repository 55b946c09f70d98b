"""Truncated SVD of a tensor-parallel sharded matrix, and the cheap re-factorisation at rank-decay boundaries.

Neither gathers the sharded matrix. Both work on Gram matrices of the REPLICATED side (never larger than the
layer's unsharded dimension), all-reduced over the TP group and decomposed in float64 on every rank, so all
ranks (and all TP sizes) get the same factors up to rounding; signs are fixed by a convention so that the
factors themselves, not only their product, agree.

Layouts (matching megatron's parallel linears):
- ``shard_dim=0`` (column-parallel): E rows are split, E_local [m/tp, n]; L rows split, R replicated.
- ``shard_dim=1`` (row-parallel): E columns are split, E_local [m, n/tp]; L replicated, R columns split.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_qvgen.quant.tp_reduce import all_reduce_sum

_REL_EPS = 1e-12


def _column_signs(vectors: torch.Tensor) -> torch.Tensor:
    """+-1 per column making its largest-magnitude entry positive (eigen/singular vectors' sign is arbitrary)."""
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1], device=vectors.device)])
    signs[signs == 0] = 1.0
    return signs


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    return vectors * _column_signs(vectors)


def _top_eigh(gram: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Largest ``rank`` eigenpairs (descending) of a symmetric PSD float64 matrix; padded with zeros."""
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.flip(0).clamp_min(0.0)
    evecs = _fix_signs(evecs.flip(1))
    k = min(rank, evals.numel())
    out_vals = torch.zeros(rank, dtype=gram.dtype, device=gram.device)
    out_vecs = torch.zeros(gram.shape[0], rank, dtype=gram.dtype, device=gram.device)
    out_vals[:k] = evals[:k]
    out_vecs[:, :k] = evecs[:, :k]
    return out_vals, out_vecs


def _inv_sqrt(values: torch.Tensor) -> torch.Tensor:
    """1/sqrt(v) for v above a relative floor, 0 otherwise (pseudo-inverse of rank-deficient factors)."""
    floor = values.max().clamp_min(0.0) * _REL_EPS
    out = torch.zeros_like(values)
    keep = values > floor
    out[keep] = values[keep].rsqrt()
    return out


def truncated_svd(e_local: torch.Tensor, rank: int, shard_dim: int,
                  group: Optional[dist.ProcessGroup] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of the full matrix whose shard this rank holds.

    Returns ``(L_local, R_local, singular_values)`` with ``L = U sqrt(S)``, ``R = sqrt(S) V^T`` sharded like
    the matrix (rank beyond min(m, n) is padded with zero columns). Float64 inside, float32 out.
    """
    if shard_dim not in (0, 1):
        raise ValueError(f"shard_dim must be 0 (rows split) or 1 (columns split), got {shard_dim}")
    e = e_local.detach().double()
    if shard_dim == 0:
        gram = all_reduce_sum(e.T @ e, group)            # n x n, replicated side: columns
        evals, v = _top_eigh(gram, rank)
        sigma = evals.sqrt()
        l_local = (e @ v) * _inv_sqrt(sigma)              # U sqrt(S) = E V S^-1/2
        r = sigma.sqrt().unsqueeze(1) * v.T
    else:
        gram = all_reduce_sum(e @ e.T, group)            # m x m, replicated side: rows
        evals, u = _top_eigh(gram, rank)
        sigma = evals.sqrt()
        l_local = u * sigma.sqrt()
        r = _inv_sqrt(sigma).unsqueeze(1) * (u.T @ e)     # S^-1/2 U^T E = sqrt(S) V^T
    return l_local.float(), r.float(), sigma.float()


def refactor_transforms(l_kept: torch.Tensor, r_kept: torch.Tensor, l_sharded: bool,
                        group: Optional[dist.ProcessGroup] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Small k x k matrices (T_L, T_R), float64, with ``L_new = L' T_L`` and ``R_new = T_R R'`` such that
    ``L_new R_new = L' R'`` and ``L_new = U sqrt(S)``, ``R_new = sqrt(S) V^T`` for the SVD of ``L' R'``
    (singular values descending, so the next phase decays the weakest directions).

    With G_L = L'^T L' = A_L^2 and G_R = R' R'^T = A_R^2 (symmetric square roots), the SVD of the k x k core
    A_L A_R = U S V^T gives T_L = A_L^+ U S^1/2 and T_R = S^1/2 V^T A_R^+ (pseudo-inverses keep it exact for
    rank-deficient factors). Only the two k x k Gram matrices cross the TP group.
    """
    l = l_kept.detach().double()
    r = r_kept.detach().double()
    g_l = l.T @ l
    g_r = r @ r.T
    if l_sharded:
        all_reduce_sum(g_l, group)
    else:
        all_reduce_sum(g_r, group)
    a_l, a_l_pinv = _psd_sqrt(g_l)
    a_r, a_r_pinv = _psd_sqrt(g_r)
    u, s, vh = torch.linalg.svd(a_l @ a_r)
    signs = _column_signs(u)
    u, vh = u * signs, vh * signs.unsqueeze(1)   # U S V^T unchanged
    root = s.sqrt()
    t_l = a_l_pinv @ u * root
    t_r = root.unsqueeze(1) * vh @ a_r_pinv
    return t_l, t_r


def _psd_sqrt(gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its pseudo-inverse."""
    evals, q = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0.0)
    root = evals.sqrt()
    return (q * root) @ q.T, (q * _inv_sqrt(evals)) @ q.T
