"""Distributed truncated SVD and re-factorisation against torch.linalg.svd of the gathered matrix."""
import pytest
import torch

from megatron_qvgen.config import ParallelConfig
from multiproc import run_distributed
from numerics import assert_rel_close

M, N, RANK = 40, 32, 8


def _matrix():
    g = torch.Generator().manual_seed(11)
    # decaying spectrum plus noise: a realistic quantisation-error-like matrix
    u, _ = torch.linalg.qr(torch.randn(M, N, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -2, N, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def _svd_shards(rank, world):
    from megatron.core import parallel_state as ps

    from megatron_qvgen.parallel import initialize_parallel
    from megatron_qvgen.quant.distributed_svd import refactor_transforms, truncated_svd

    initialize_parallel(ParallelConfig(tensor_parallel=world))
    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_rank()
    e = _matrix()
    out = {}
    for dim in (0, 1):
        local = e.chunk(world, dim=dim)[tp]
        l, r, s = truncated_svd(local, RANK, shard_dim=dim, group=group)
        out[f"L{dim}"], out[f"R{dim}"], out[f"S{dim}"] = l, r, s
        # re-factor the first k columns of those factors (the rank-decay boundary operation)
        k = RANK // 2
        lk, rk = l[:, :k], r[:k]
        t_l, t_r = refactor_transforms(lk, rk, l_sharded=(dim == 0), group=group)
        out[f"L{dim}_new"] = (lk.double() @ t_l).float()
        out[f"R{dim}_new"] = (t_r @ rk.double()).float()
    # wider than the matrix: padded with zero columns, product still the full matrix
    l, r, _ = truncated_svd(e.chunk(world, dim=0)[tp], N + 5, shard_dim=0, group=group)
    out["L_pad"], out["R_pad"] = l, r
    return out


def _gather(results, key, dim):
    return torch.cat([r[key] for r in results], dim=dim)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_distributed_svd_matches_full_svd(world):
    e = _matrix().double()
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    results = run_distributed(_svd_shards, world)
    for dim in (0, 1):
        if dim == 0:
            l, r = _gather(results, "L0", 0), results[0]["R0"]
        else:
            l, r = results[0]["L1"], _gather(results, "R1", 1)
        assert_rel_close(results[0][f"S{dim}"].double(), s[:RANK], 1e-4, what=f"singular values (shard {dim})")
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        assert_rel_close((l.double() @ r.double()), best, 1e-4, what=f"rank-{RANK} reconstruction (shard {dim})")
        # L = U sqrt(S), R = sqrt(S) V^T up to the sign of each singular pair
        signs = torch.sign((l.double() * u[:, :RANK]).sum(0))
        assert_rel_close(l.double() * signs, u[:, :RANK] * s[:RANK].sqrt(), 1e-4, what="L = U sqrt(S)")
        # re-factorisation: same product, factors balanced as U sqrt(S) / sqrt(S) V^T of that product
        k = RANK // 2
        l_new = _gather(results, f"L{dim}_new", 0) if dim == 0 else results[0][f"L{dim}_new"]
        r_new = results[0][f"R{dim}_new"] if dim == 0 else _gather(results, f"R{dim}_new", 1)
        prod = l[:, :k].double() @ r[:k].double()
        assert_rel_close(l_new.double() @ r_new.double(), prod, 1e-5, what="re-factored product")
        su = torch.linalg.svdvals(prod)[:k]
        assert_rel_close(l_new.double().norm(dim=0) ** 2, su, 1e-4, what="re-factored column norms = S")
    l_pad, r_pad = _gather(results, "L_pad", 0), results[0]["R_pad"]
    assert l_pad.shape == (M, N + 5) and torch.all(l_pad[:, N:] == 0)
    assert_rel_close(l_pad.double() @ r_pad.double(), e, 1e-5, what="full-rank padded reconstruction")
