"""Rank decay: schedule, distributed truncation + re-factorisation, optimizer hand-over, deletion at r = 0."""
import math

import pytest
import torch

from megatron_qvgen.config import ConfigError, ExperimentConfig, ParallelConfig, QuantConfig, TrainConfig
from megatron_qvgen.quant.rank_decay import RankDecaySchedule
from multiproc import run_distributed
from numerics import assert_rel_close

T = 3


def test_schedule_ranks_gates_and_boundaries():
    sched = RankDecaySchedule(QuantConfig(), phase_steps=T)
    ranks = [sched.rank_at(s) for s in range(0, 7 * T)]
    assert ranks[::T] == [32, 16, 8, 4, 2, 1, 0]
    assert [s for s in range(7 * T) if sched.boundary_rank(s) is not None] == [T * i for i in range(1, 7)]
    assert sched.gate_at(0) == 1.0 and sched.gate_at(T) == 1.0
    assert sched.gate_at(1) == pytest.approx((1 + math.cos(math.pi / T)) / 2)
    lin = RankDecaySchedule(QuantConfig(decay_anneal="linear"), phase_steps=4)
    assert [lin.gate_at(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    # ablations
    assert RankDecaySchedule(QuantConfig.for_method("decay_all"), T).ranks == (32, 0)
    keep = RankDecaySchedule(QuantConfig.for_method("qvgen_keep_aux"), T)
    assert keep.rank_at(100 * T) == 32 and keep.boundary_rank(T) is None and keep.gate_at(1) == 1.0
    assert RankDecaySchedule(QuantConfig.for_method("lsq"), T).rank_at(0) == 0
    assert QuantConfig(aux_rank=12, decay_fraction=0.25).rank_sequence() == (12, 9, 6, 4, 3, 2, 1, 0)


def test_experiment_config_requires_decay_to_finish_before_training_ends():
    assert ExperimentConfig(train=TrainConfig(steps=2667)).decay_phase_steps == 444  # the published Wan run
    assert ExperimentConfig(train=TrainConfig(steps=601)).decay_phase_steps == 100
    with pytest.raises(ConfigError, match="must be gone before training ends"):
        ExperimentConfig(quant=QuantConfig(decay_phase_steps=100), train=TrainConfig(steps=600))
    with pytest.raises(ConfigError, match="no room for the 6 rank-decay phases"):
        ExperimentConfig(train=TrainConfig(steps=6))


def _decay_run(rank, world):
    from megatron_qvgen.parallel import initialize_parallel
    from megatron_qvgen.quant import quant_context
    from megatron_qvgen.quant.rank_decay import RankDecay, TorchOptimizerAdapter

    from test_quant_linear_tp import build_pair

    initialize_parallel(ParallelConfig(tensor_parallel=world), seed=5)
    quant = QuantConfig.for_method("qvgen", "w4a4", aux_rank=32)
    col, row = build_pair(world, quant)
    from megatron_qvgen.quant import initialize_quantizers

    initialize_quantizers([col, row])
    params = list(col.parameters()) + list(row.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    decay = RankDecay([col, row], RankDecaySchedule(quant, T), TorchOptimizerAdapter(opt))
    groups = torch.tensor([1, 2, 3])
    log = {"rank": [], "product_error": []}
    x = torch.randn(8, 3, 24, generator=torch.Generator().manual_seed(9))
    for step in range(6 * T + 1):
        before = None
        if decay.schedule.boundary_rank(step) is not None:
            k = decay.schedule.boundary_rank(step)
            before = [(l.aux_L[:, :k].double() @ l.aux_R[:k].double()) for l in (col, row)]
        gate = decay.on_step(step)
        if before is not None and decay.current_rank() > 0:
            after = [(l.aux_L.double() @ l.aux_R.double()) for l in (col, row)]
            log["product_error"].append(max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before)))
            in_opt = [p for g in opt.param_groups for p in g["params"]]
            log["factors_in_optimizer"] = log.get("factors_in_optimizer", True) and all(
                any(p is f for p in in_opt) and _moments_zero(opt.state.get(f)) for l in (col, row) for f in (l.aux_L, l.aux_R))
        log["rank"].append(decay.current_rank())
        opt.zero_grad()
        with quant_context(timestep_groups=groups, aux_gate=gate):
            y, _ = row(torch.nn.functional.gelu(col(x)[0]))
        y.square().mean().backward()
        opt.step()
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    model_params = list(col.parameters()) + list(row.parameters())
    # the plain quantised matmul, computed here from the layers' own quantizers
    with quant_context(timestep_groups=groups):
        y, _ = row(torch.nn.functional.gelu(col(x)[0]))
        h_ref = torch.nn.functional.linear(col.act_quantizer(x, groups), col.weight_quantizer(col.weight), col.bias)
    return {
        "ranks": torch.tensor(log["rank"]),
        "product_error": torch.tensor(log["product_error"]),
        "factors_in_optimizer": torch.tensor(log["factors_in_optimizer"]),
        "no_aux": torch.tensor(all("aux" not in n for l in (col, row) for n, _ in l.named_parameters())),
        "opt_is_model": torch.tensor(len(opt_params) == len(model_params)
                                     and all(any(p is q for q in model_params) for p in opt_params)),
        "h": col_forward_plain(col, x, groups),
        "h_ref": h_ref.detach(),
    }


def _moments_zero(state):
    return bool(state) and all(float(v.abs().max()) == 0 for k, v in state.items() if k != "step")


def col_forward_plain(col, x, groups):
    from megatron_qvgen.quant import quant_context

    with quant_context(timestep_groups=groups):
        return col(x)[0].detach()


@pytest.mark.parametrize("world", [1, 2])
def test_six_phases_reach_rank_zero_with_optimizer_handover(world):
    results = run_distributed(_decay_run, world)
    for r in results:
        assert r["ranks"][::T].tolist() == [32, 16, 8, 4, 2, 1, 0]
        assert r["product_error"].numel() == 5 and float(r["product_error"].max()) < 1e-5
        assert bool(r["factors_in_optimizer"]), "re-factored L/R are not the optimizer's params, or their moments were not reset"
        assert bool(r["no_aux"]), "auxiliary parameters survive rank 0"
        assert bool(r["opt_is_model"]), "optimizer params differ from the model's after rank decay"
        # at r = 0 the layer is exactly the plain quantised matmul
        assert torch.equal(r["h"], r["h_ref"])
