"""What a rank-decay boundary does to the Adam moments of L and R (``quant.decay_moments``), at TP = 1 and 2:
``realign`` carries the first moment onto the new factors exactly (it equals the gradient of the re-factored
L and R, taken after the boundary), ``keep`` leaves the kept columns' moments as they were, ``reset`` zeroes them;
the squared map for the second moment is exact for uncorrelated gradient columns."""
import pytest
import torch

from megatron_qvgen.config import ConfigError, ParallelConfig, QuantConfig
from megatron_qvgen.quant.decay_moments import boundary_moment_remap
from multiproc import run_distributed

OLD, NEW = 8, 4


def _boundary(rank, world, policy):
    from megatron_qvgen.parallel import initialize_parallel
    from megatron_qvgen.quant import initialize_quantizers, quant_context
    from megatron_qvgen.quant.rank_decay import RankDecay, RankDecaySchedule, TorchOptimizerAdapter

    from test_quant_linear_tp import build_pair

    initialize_parallel(ParallelConfig(tensor_parallel=world), seed=5)
    quant = QuantConfig.for_method("qvgen", "w4a4", aux_rank=OLD, decay_moments=policy)
    col, row = build_pair(world, quant)
    initialize_quantizers([col, row])
    mix = torch.eye(NEW) + 0.5 * torch.randn(NEW, NEW, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():   # the SVD initialisation is already the boundary's basis: mix the kept columns
        for layer in (col, row):
            layer.aux_L[:, :NEW] = layer.aux_L[:, :NEW] @ mix
            layer.aux_R[:NEW] = torch.linalg.solve(mix, layer.aux_R[:NEW])
    # betas 0: after one step exp_avg is the gradient and exp_avg_sq its square; lr 0: the step moves nothing
    opt = torch.optim.AdamW(list(col.parameters()) + list(row.parameters()), lr=0.0, betas=(0.0, 0.0),
                            weight_decay=0.0)
    groups = torch.tensor([1, 2, 3])
    x = torch.randn(8, 3, 24, generator=torch.Generator().manual_seed(9))

    def loss(gate):
        with quant_context(timestep_groups=groups, aux_gate=gate):
            y, _ = row(torch.nn.functional.gelu(col(x)[0]))
        return y.square().mean()

    factors = [f for layer in (col, row) for f in (layer.aux_L, layer.aux_R)]
    before = loss(0.0)              # the end of a phase: the decaying columns contribute nothing
    before.backward()
    opt.step()
    old = [{k: opt.state[f][k].clone() for k in ("exp_avg", "exp_avg_sq")} for f in factors]
    RankDecay([col, row], RankDecaySchedule(quant, 3), TorchOptimizerAdapter(opt)).apply_rank(NEW)
    opt.zero_grad()
    after = loss(1.0)
    after.backward()
    out = {"loss": torch.stack([before.detach(), after.detach()])}
    for i, f in enumerate(factors):
        out[f"m{i}"] = opt.state[f]["exp_avg"].clone()
        out[f"v{i}"] = opt.state[f]["exp_avg_sq"].clone()
        out[f"g{i}"] = f.grad.clone()
        out[f"old_m{i}"] = old[i]["exp_avg"]
    return out


def _kept(t, i):
    return (t[:, :NEW], t[:, NEW:]) if i % 2 == 0 else (t[:NEW], t[NEW:])   # L: columns, R: rows


@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2"])
@pytest.mark.parametrize("policy", ["reset", "realign", "keep"])
def test_boundary_moments(world, policy):
    for r in run_distributed(_boundary, world, policy):
        assert float((r["loss"][0] - r["loss"][1]).abs() / r["loss"][0]) < 1e-6, "the boundary changed the output"
        for i in range(4):
            m_kept, m_dropped = _kept(r[f"m{i}"], i)
            assert float(m_dropped.abs().max()) == 0 and float(_kept(r[f"v{i}"], i)[1].abs().max()) == 0
            assert float(r[f"v{i}"].min()) >= 0
            if policy == "reset":
                assert float(r[f"m{i}"].abs().max()) == 0 and float(r[f"v{i}"].abs().max()) == 0
            elif policy == "keep":
                assert torch.equal(m_kept, _kept(r[f"old_m{i}"], i)[0])
            else:   # the first moment of the new factors is their gradient after the boundary
                g = _kept(r[f"g{i}"], i)[0]
                err = float((m_kept - g).abs().max() / g.abs().max())
                assert err < 1e-5, f"factor {i}: realigned exp_avg differs from the new gradient by {err:.2e}"
                assert float((m_kept - _kept(r[f"old_m{i}"], i)[0]).abs().max()) > 1e-3 * float(g.abs().max())


def test_squared_map_is_the_second_moment_of_uncorrelated_columns():
    gen = torch.Generator().manual_seed(0)
    grad_map = torch.randn(NEW, NEW, generator=gen, dtype=torch.float64)
    spread = torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64)
    samples = torch.randn(40000, 3, OLD, generator=gen, dtype=torch.float64)
    samples[..., :NEW] *= spread                                  # independent columns, unequal variances
    moments = {"exp_avg": samples.mean(0), "exp_avg_sq": samples.square().mean(0)}
    new = boundary_moment_remap("realign", grad_map, NEW, left=True)(moments)
    truth = (samples[..., :NEW] @ grad_map).square().mean(0)
    assert float(((new["exp_avg_sq"][:, :NEW] - truth).abs() / truth).max()) < 0.05
    right = boundary_moment_remap("realign", grad_map.T, NEW, left=False)({"exp_avg_sq": moments["exp_avg_sq"].T})
    assert torch.allclose(right["exp_avg_sq"][:NEW], new["exp_avg_sq"][:, :NEW].T)


def test_unknown_policy_is_refused():
    with pytest.raises(ConfigError, match="decay_moments"):
        QuantConfig(decay_moments="rotate")
    with pytest.raises(ValueError, match="decay_moments"):
        boundary_moment_remap("rotate", torch.eye(2), 2, left=True)
