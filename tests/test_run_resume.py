"""A resume continues the run its checkpoint belongs to: refused changes write nothing, a longer train.steps
follows a schedule of the new length (never lr 0), rank-decay phases stay consistent, a finished run says
it is complete."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from megatron_qvgen.training.run_config_check import RunConfigMismatch, plan_resume
from multiproc import run_distributed
from test_trainer import teacher_ckpt, tiny_cfg  # noqa: F401 - teacher_ckpt: the fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _derived_phases(cfg, steps):
    """tiny_cfg with rank-decay phases derived from train.steps (3 phases: 4 -> 2 -> 1 -> 0)."""
    cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, decay_phase_steps=None))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


# ---------------------------------------------------------------------------------------- the rules
def test_changed_bits_and_model_are_refused_naming_each_field(tmp_path):
    old = tiny_cfg(str(tmp_path / "r"))
    new = dataclasses.replace(old, quant=dataclasses.replace(old.quant, weight_bits=3),
                              model=dataclasses.replace(old.model, num_layers=3))
    with pytest.raises(RunConfigMismatch) as err:
        plan_resume(old.to_dict(), new, 6, "ckpt/iter_0000006", own=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "quant.weight_bits 4 -> 3" in msg and "model.num_layers 2 -> 3" in msg
    assert "--train.save_dir" in msg and "ckpt/iter_0000006" in msg
    other = dataclasses.replace(old, data=dataclasses.replace(old.data, seed=7),
                                train=dataclasses.replace(old.train, precision="bf16"))
    with pytest.raises(RunConfigMismatch, match=r"data.seed 1234 -> 7.*train.precision 'fp32' -> 'bf16'"):
        plan_resume(old.to_dict(), other, 6, "c", own=True)


def test_layout_lr_and_longer_runs_are_accepted(tmp_path):
    old = tiny_cfg(str(tmp_path / "r"))
    new = tiny_cfg(str(tmp_path / "r"), tp=2, steps=20, lr=5e-4, save_interval=3)
    plan = plan_resume(old.to_dict(), new, 10, "c", own=True)
    assert not plan.complete and plan.cfg is new
    assert any("train.steps 10 -> 20" in n for n in plan.notes)
    moments = dataclasses.replace(new, quant=dataclasses.replace(new.quant, decay_moments="realign"))
    assert plan_resume(old.to_dict(), moments, 10, "c", own=True).cfg is moments   # how the optimizer is driven
    # a finished run, started again as it was (or shorter), is complete
    assert plan_resume(old.to_dict(), old, 10, "c", own=True).complete
    assert plan_resume(old.to_dict(), tiny_cfg(str(tmp_path / "r"), steps=8), 10, "c", own=True).complete


def test_rank_decay_phases_follow_the_new_length_only_where_they_can(tmp_path):
    old = _derived_phases(tiny_cfg(str(tmp_path / "r")), 10)          # T = 3: boundaries at 3, 6, 9
    longer = _derived_phases(old, 19)                                  # T = 6
    # step 2: phase 1 under both lengths -> the new T
    early = plan_resume(old.to_dict(), longer, 2, "c", own=True)
    assert early.cfg.decay_phase_steps == 6 and any("now last 6 steps" in n for n in early.notes)
    # step 10: rank 0 already (phase 4 of T = 3), T = 6 would say phase 2 -> T stays 3
    late = plan_resume(old.to_dict(), longer, 10, "c", own=True)
    assert late.cfg.decay_phase_steps == 3 and late.cfg.train.steps == 19
    assert any("keep T = 3" in n and "gone at step 9" in n for n in late.notes)
    # an explicit T that moves the checkpoint to another phase is refused
    explicit = dataclasses.replace(longer, quant=dataclasses.replace(longer.quant, decay_phase_steps=5))
    with pytest.raises(RunConfigMismatch, match=r"quant.decay_phase_steps 3 -> 5"):
        plan_resume(old.to_dict(), explicit, 7, "c", own=True)


# ---------------------------------------------------------------------------------------- in a run
def _run(rank, world, cfg, init_from):
    from megatron_qvgen.training.loop import Trainer
    from megatron_qvgen.training.optimizer import lrs_by_group

    trainer = Trainer(cfg, init_from=init_from).setup()
    lrs = []
    one_step = trainer._one_step

    def recording(num_micro):
        one_step(num_micro)
        lrs.append(lrs_by_group(trainer.opt.optimizer, trainer.cfg)["weights"])

    trainer._one_step = recording
    state = trainer.train()
    return {"lrs": torch.tensor(lrs, dtype=torch.float64), "step": torch.tensor(state.step),
            "rank": torch.tensor(trainer.decay.current_rank()), "exit": torch.tensor(state.outcome.exit_code),
            "phase_steps": torch.tensor(trainer.cfg.decay_phase_steps)}



def test_extending_train_steps_follows_a_schedule_of_the_new_length(teacher_ckpt):
    root, init = teacher_ckpt
    run = str(root / "extend")
    save = os.path.join(run, "ckpt")
    first = run_distributed(_run, 1, _derived_phases(tiny_cfg(run, save_dir=save, warmup_fraction=0.2), 10), init)[0]
    assert int(first["step"]) == 10 and float(first["lrs"][-1]) == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    longer = _derived_phases(tiny_cfg(run, save_dir=save, warmup_fraction=0.2), 19)
    second = run_distributed(_run, 1, longer, init)[0]
    assert int(second["step"]) == 19 and int(second["exit"]) == 0
    assert int(second["rank"]) == 0 and int(second["phase_steps"]) == 3   # decay stayed where it had ended
    # the lr of steps 11..19 is a 19-step schedule's (warm-up 3, cosine to 0), not the old one's 0
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class _Opt:
        param_groups = [{"max_lr": longer.train.lr, "min_lr": 0.0}]

    ref = OptimizerParamScheduler(_Opt(), init_lr=0.0, max_lr=longer.train.lr, min_lr=0.0, lr_warmup_steps=3,
                                  lr_decay_steps=19, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                  wd_incr_steps=19, wd_incr_style="constant")
    expected = []
    for step in range(11, 20):
        ref.num_steps = step
        expected.append(ref.get_lr(_Opt.param_groups[0]))
    assert torch.allclose(second["lrs"], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)
    assert float(second["lrs"][0]) > 0.4 * longer.train.lr   # megatron alone would give 0


def _cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO}/kernels", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_qvgen.train", "--recipe", "tiny_wan", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _recipe_run(rank, world, args):
    """What `python -m megatron_qvgen.train --recipe tiny_wan ARGS` runs, in an already warm process."""
    from megatron_qvgen.config import apply_overrides, parse_override_args
    from megatron_qvgen.recipes import get_recipe
    from megatron_qvgen.training.loop import Trainer

    state = Trainer(apply_overrides(get_recipe("tiny_wan"), parse_override_args(args))).setup().train()
    return {"exit": torch.tensor(state.outcome.exit_code), "step": torch.tensor(state.step)}


def _snapshot(folder):
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(base, f)
            out[os.path.relpath(p, folder)] = (os.path.getmtime(p), os.path.getsize(p))
    return out


def test_changed_weight_bits_is_refused_and_a_finished_run_is_complete(tmp_path):
    common = ["--data.shards", str(tmp_path / "data"), "--data.synthesize_if_missing", "true",
              "--data.synthetic_samples", "8", "--data.synthetic_latent_size", "2,8,8",
              "--train.save_dir", str(tmp_path / "ckpt"), "--train.steps", "5", "--train.log_interval", "5"]
    first = run_distributed(_recipe_run, 1, common)[0]
    assert int(first["exit"]) == 0 and int(first["step"]) == 5
    latest = (tmp_path / "ckpt" / "latest").read_text()
    before = _snapshot(tmp_path / "ckpt")
    refused = _cli(common[:-4] + ["--train.steps", "9", "--quant.weight_bits", "3"], tmp_path)
    assert refused.returncode != 0
    assert "quant.weight_bits 4 -> 3" in refused.stderr and "--train.save_dir" in refused.stderr
    assert (tmp_path / "ckpt" / "latest").read_text() == latest and _snapshot(tmp_path / "ckpt") == before
    again = _cli(common, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "qvgen: run complete" in again.stdout.strip().splitlines()[-1]
    assert _snapshot(tmp_path / "ckpt") == before
