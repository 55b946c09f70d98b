"""Rank decay with megatron's distributed optimizer, real gloo ranks: every phase down to r = 0 at DP = 2 and
TP = 2 x DP = 2 equals the plain optimizer; each boundary keeps L R exact in the fp32 main params, leaves the
model copy equal to the rounded main copy and zeroes (or, realigned, re-maps) the moments on every rank; the recipes' derived phase
length works; a distributed-optimizer checkpoint survives SIGKILL and resumes at DP = 2, DP = 1 and TP = 2."""
import dataclasses
import os
import signal

import pytest
import torch

from megatron_qvgen.config import ParallelConfig, QuantConfig
from multiproc import DistributedTestError, run_distributed
from test_trainer import teacher_ckpt  # noqa: F401 - the fixture: one teacher checkpoint for the module
from test_trainer import tiny_cfg

T = 3                   # phase length: the gate goes 1, 0.75, 0.25 within each phase
STEPS = 12              # ranks 4 | 2 | 1 | 0, three steps each
RANKS = [4] * T + [2] * T + [1] * T + [0] * T


def decay_cfg(root, tp=1, distributed=True, precision="fp32", steps=STEPS, moments="reset", **train):
    base = tiny_cfg(root, tp=tp, steps=steps, precision=precision, **train)
    return dataclasses.replace(
        base, quant=QuantConfig.for_method("qvgen", "w4a4", aux_rank=4, decay_phase_steps=T, decay_moments=moments),
        parallel=ParallelConfig(tensor_parallel=tp, distributed_optimizer=distributed))


def _rel(a, b):
    """Largest difference relative to the largest magnitude (elementwise ratios blow up near 0)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _watch_boundaries(trainer, log):
    """Wrap the rank-decay step so that every boundary is checked from the optimizer's side, on every rank."""
    from megatron_qvgen.quant import quant_linears
    from megatron_qvgen.quant.decay_moments import boundary_moment_remap
    from megatron_qvgen.quant.distributed_svd import refactor_transforms
    from megatron_qvgen.training.main_params import MOMENTS, locate

    decay = trainer.decay
    apply_step = decay.on_step
    realign = decay.schedule.quant.decay_moments == "realign"
    moments = lambda p: locate(trainer.opt.optimizer, p).gather(MOMENTS)  # noqa: E731 - collective (DP pieces)

    def expected_moments(layer, lm, rm, k):
        """What realign must leave: the maps of decay_moments applied to the whole moments gathered before."""
        t_l, t_r = refactor_transforms(lm[:, :k].float(), rm[:k].float(), l_sharded=layer._rows_split,
                                       group=layer._tp_group_if_split)
        ml, mr = ({m: w[m] for m in MOMENTS} for w in (moments(layer.aux_L), moments(layer.aux_R)))
        want = (boundary_moment_remap("realign", t_r.T, k, left=True)(ml),
                boundary_moment_remap("realign", t_l.T, k, left=False)(mr))
        kept = (boundary_moment_remap("keep", t_r.T, k, left=True)(ml),
                boundary_moment_remap("keep", t_l.T, k, left=False)(mr))
        log["realign_change"].append(max(_rel(w["exp_avg"], c["exp_avg"]) for w, c in zip(want, kept)))
        return want

    def on_step(step):
        k = decay.schedule.boundary_rank(step)
        layers = [l for l in quant_linears(trainer.student) if l.has_aux] if k else []
        masters = lambda l: (decay.adapter.full_master(l.aux_L).double(), decay.adapter.full_master(l.aux_R).double())
        before = [(lm[:, :k] @ rm[:k]) for lm, rm in map(masters, layers)] if k else []
        expected = [expected_moments(l, *masters(l), k) for l in layers] if k and realign else []
        gate = apply_step(step)
        for layer, want in zip(layers, expected):
            for p, w in zip((layer.aux_L, layer.aux_R), want):
                got = moments(p)
                log["realign_error"].append(max(_rel(got[m], w[m]) for m in MOMENTS))
        if k:
            errors = []
            for layer, product in zip(layers, before):
                lm, rm = masters(layer)
                errors.append(_rel(lm @ rm, product))
                for p, main in ((layer.aux_L, lm), (layer.aux_R, rm)):
                    log["model_is_rounded_main"] &= torch.equal(p.detach(), main.to(p.dtype))
                    state = locate(trainer.opt.optimizer, p).state() or {}
                    log["moments_zero"] &= all(float(state[m].abs().max()) == 0 for m in MOMENTS if m in state)
            log["product_error"].append(max(errors))
        log["rank"].append(decay.current_rank())
        log["gate"].append(gate)
        return gate

    decay.on_step = on_step


def _train(rank, world, cfg, init_from, kill_at=None):
    from megatron_qvgen.training.loop import Trainer

    class Killable(Trainer):
        def _one_step(self, num_micro):
            if kill_at is not None and self.state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            super()._one_step(num_micro)

    trainer = Killable(cfg, init_from=init_from).setup()
    log = {"rank": [], "gate": [], "product_error": [], "model_is_rounded_main": True, "moments_zero": True,
           "realign_error": [], "realign_change": []}
    _watch_boundaries(trainer, log)
    state = trainer.train()
    raw = trainer.opt.chunks[0].module
    return {
        "losses": torch.tensor(state.losses, dtype=torch.float64),
        "ranks": torch.tensor(log["rank"]), "gates": torch.tensor(log["gate"]),
        "product_error": torch.tensor(log["product_error"], dtype=torch.float64),
        "model_is_rounded_main": torch.tensor(log["model_is_rounded_main"]),
        "moments_zero": torch.tensor(log["moments_zero"]),
        "realign_error": torch.tensor(log["realign_error"], dtype=torch.float64),
        "realign_change": torch.tensor(log["realign_change"], dtype=torch.float64),
        "aux_params": torch.tensor(sum("aux_" in n for n, _ in raw.named_parameters())),
        "weights": {n: p.detach().clone() for n, p in raw.named_parameters()},
    }


def _check_boundaries(out, ranks, boundaries, reset=True):
    for r in out:
        assert r["ranks"].tolist() == ranks
        assert float(r["gates"].min()) < 0.5, "the gate never annealed below 1 within a phase"
        assert r["product_error"].numel() == boundaries and float(r["product_error"].max()) < 1e-6, r["product_error"]
        assert bool(r["model_is_rounded_main"]), "model copy of L/R differs from the rounded main params after a boundary"
        assert bool(r["moments_zero"]) == reset, ("Adam moments of the re-factored L/R were not reset on every rank"
                                                  if reset else "realigned moments are zero")
        assert int(r["aux_params"]) == 0, "auxiliary factors survive rank 0"


def _check_equal(dopt, plain, tol=1e-6):
    assert _rel(dopt[-1]["losses"], plain[-1]["losses"]) < tol, (dopt[-1]["losses"], plain[-1]["losses"])
    _check_weights(dopt, plain, tol)


def _check_weights(dopt, plain, tol):
    for rank, (d, p) in enumerate(zip(dopt, plain)):
        assert d["weights"].keys() == p["weights"].keys()
        for name, tensor in p["weights"].items():
            assert _rel(d["weights"][name], tensor) < tol, f"rank {rank}: {name} differs from the plain optimizer's"


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)], ids=["dp2", "tp2xdp2"])
def test_every_phase_to_rank_zero_equals_the_plain_optimizer(teacher_ckpt, world, tp):
    root, path = teacher_ckpt
    plain = run_distributed(_train, world, decay_cfg(str(root / f"plain{world}"), tp, distributed=False), path)
    dopt = run_distributed(_train, world, decay_cfg(str(root / f"dopt{world}"), tp, distributed=True), path)
    _check_boundaries(dopt, RANKS, boundaries=2)   # 4 -> 2 -> 1 re-factor; 1 -> 0 deletes
    _check_boundaries(plain, RANKS, boundaries=2)
    _check_equal(dopt, plain)


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)], ids=["dp2", "tp2xdp2"])
def test_realigned_moments_with_distributed_optimizer(teacher_ckpt, world, tp):
    """quant.decay_moments=realign: at each boundary every factor's moments, gathered whole from their DP pieces
    after it, equal the realign maps applied to those gathered before it (with the TP-reduced transforms); the run
    equals the plain optimizer's with the same policy."""
    root, path = teacher_ckpt
    plain = run_distributed(_train, world, decay_cfg(str(root / f"plain_realign{world}"), tp, distributed=False,
                                                     moments="realign"), path)
    dopt = run_distributed(_train, world, decay_cfg(str(root / f"dopt_realign{world}"), tp, moments="realign"), path)
    for out in (dopt, plain):
        _check_boundaries(out, RANKS, boundaries=2, reset=False)
        for r in out:
            assert r["realign_error"].numel() > 0 and float(r["realign_error"].max()) < 1e-6, r["realign_error"]
            # and realign is not "keep": the re-factoring rotates the kept columns' moments
            assert float(r["realign_change"].max()) > 1e-3, r["realign_change"]
    _check_equal(dopt, plain)


@pytest.mark.parametrize("world", [1, 2], ids=["dp1", "dp2"])
def test_bf16_boundaries_refactor_the_fp32_main_params(teacher_ckpt, world):
    """bf16 params, fp32 main params: the re-factorisation must come from the main params (from the bf16
    model copy, as before this fix, L R moved by 5e-3 at DP = 1 and the main params were overwritten with it)."""
    root, path = teacher_ckpt
    dopt = run_distributed(_train, world, decay_cfg(str(root / f"bf16_{world}"), precision="bf16"), path)
    _check_boundaries(dopt, RANKS, boundaries=2)


def _recipe_cfg(root, distributed):
    from megatron_qvgen.config import apply_overrides, parse_override_args
    from megatron_qvgen.recipes import get_recipe

    args = ["--parallel.distributed_optimizer", str(distributed).lower(), "--train.steps", "14",
            "--data.shards", os.path.join(root, "D"), "--data.synthesize_if_missing", "true",
            "--data.synthetic_samples", "16", "--data.synthetic_latent_size", "2,8,8"]
    return apply_overrides(get_recipe("tiny_wan"), parse_override_args(args))


def test_recipe_phase_length_with_distributed_optimizer(teacher_ckpt):
    """The issue's command: tiny_wan, --train.steps 14, T derived as (steps - 1) // phases = 3, DP = 2."""
    root, _ = teacher_ckpt
    dopt_cfg, plain_cfg = _recipe_cfg(str(root / "recipe"), True), _recipe_cfg(str(root / "recipe"), False)
    assert dopt_cfg.quant.decay_phase_steps is None and dopt_cfg.decay_phase_steps == 3
    dopt = run_distributed(_train, 2, dopt_cfg, None)
    plain = run_distributed(_train, 2, plain_cfg, None)
    ranks = [8] * 3 + [4] * 3 + [2] * 3 + [1] * 3 + [0] * 2
    _check_boundaries(dopt, ranks, boundaries=3)
    _check_equal(dopt, plain)


def test_sigkill_resume_and_reshard_dp2_to_dp1(teacher_ckpt):
    """DP = 2 run killed at step 7, resumed from its step-5 checkpoint (rank 2: factors present) at DP = 2
    (bit-exact) and at DP = 1; the DP = 1 run's step-10 checkpoint (r = 0: factors gone) resumed at DP = 2
    and at TP = 2. Across layouts only the reduction order differs from the uninterrupted run."""
    root, path = teacher_ckpt
    full = run_distributed(_train, 2, decay_cfg(str(root / "full")), path)
    for name, world in (("same", 2), ("dp1", 1)):
        run_dir = str(root / f"resume_{name}")
        save = os.path.join(run_dir, "ckpt")
        cfg = decay_cfg(run_dir, save_dir=save, save_interval=5)
        with pytest.raises(DistributedTestError):
            run_distributed(_train, 2, cfg, path, kill_at=7)
        resumed = run_distributed(_train, world, cfg, path)
        assert resumed[-1]["ranks"].tolist() == RANKS[5:] and int(resumed[-1]["aux_params"]) == 0
        if world == 2:
            assert torch.equal(resumed[-1]["losses"], full[-1]["losses"][5:])
            for r, f in zip(resumed, full):
                assert all(torch.equal(r["weights"][n], t) for n, t in f["weights"].items())
            continue
        assert _rel(resumed[-1]["losses"], full[-1]["losses"][5:]) < 1e-5
        _check_weights(resumed, full[:1], tol=1e-5)
        ckpt10 = os.path.join(save, "iter_0000010")
        back = run_distributed(_train, 2, decay_cfg(run_dir, load_dir=ckpt10), path)   # DP 1 -> 2
        assert back[-1]["ranks"].tolist() == RANKS[10:]
        assert _rel(back[-1]["losses"], full[-1]["losses"][10:]) < 1e-5
        _check_weights(back, full, tol=1e-5)
        tp2 = run_distributed(_train, 2, decay_cfg(run_dir, tp=2, load_dir=ckpt10), path)   # TP 1 -> 2
        assert _rel(tp2[-1]["losses"], full[-1]["losses"][10:]) < 1e-5
