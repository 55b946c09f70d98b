"""python -m megatron_qvgen.evaluate on the tiny Wan recipe, as a user runs it: a fitted teacher, a PTQ student
worse than the teacher, a QAT-trained student better than PTQ (run folder, iter_* folder and its inference
export agreeing), and one-line errors naming the path for bad inputs. Samplers: exact on an exact model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multiproc import run_distributed

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "tiny_wan"
SAMPLES, STEPS = 4, 8
TRAIN_STEPS = 30


def _overrides(data):
    return ["--data.shards", str(data), "--data.synthesize_if_missing", "true", "--data.synthetic_samples", "32"]


def _cfg(data, **train):
    from megatron_qvgen.config import apply_overrides, parse_override_args
    from megatron_qvgen.recipes import get_recipe

    extra = []
    for key, value in train.items():
        extra += [f"--train.{key}", str(value)]
    return apply_overrides(get_recipe(RECIPE), parse_override_args(_overrides(data) + extra))


def _fit_teacher(rank, world, cfg, out):
    from megatron_qvgen.training.teacher_fit import fit_teacher

    return {"loss": torch.tensor(fit_teacher(cfg, out, steps=150, lr=1e-3))}


def _train_student(rank, world, cfg, teacher):
    from megatron_qvgen.training.loop import Trainer

    state = Trainer(cfg, init_from=teacher).setup().train()
    return {"loss": torch.tensor(state.losses[-1])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A teacher fitted on the synthetic set, a W4A4 QVGen student distilled from it (rank decay to 0), its export."""
    from megatron_qvgen.convert.to_inference import export_inference

    root = tmp_path_factory.mktemp("evaluate")
    data, teacher, run = root / "data", str(root / "teacher"), str(root / "run")
    run_distributed(_fit_teacher, 1, _cfg(data), teacher, timeout=600)
    cfg = _cfg(data, steps=TRAIN_STEPS, lr=1e-4, aux_lr=1e-4, save_dir=run, save_interval=0, log_interval=TRAIN_STEPS)
    run_distributed(_train_student, 1, cfg, teacher, timeout=600)
    export_inference(run, str(root / "export"), progress=False)
    return root


def _evaluate(root, student, name, *extra, expect_ok=True):
    out = root / f"{name}.json"
    cmd = [sys.executable, "-m", "megatron_qvgen.evaluate", "--teacher", str(root / "teacher"), "--student", student,
           "--json", str(out), "--samples", str(SAMPLES), "--sampling-steps", str(STEPS), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rel_l2" in proc.stdout and "psnr_db" in proc.stdout  # the console table
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ptq(runs):
    return _evaluate(runs, "ptq", "ptq", "--recipe", RECIPE, *_overrides(runs / "data"))


@pytest.fixture(scope="module")
def trained(runs):
    return _evaluate(runs, str(runs / "run"), "trained")


def test_ptq_student_is_worse_than_the_teacher(runs, ptq):
    assert ptq["student_kind"] == "ptq" and ptq["samples"] == SAMPLES and ptq["sampling_steps"] == STEPS
    assert 0.0 < ptq["rel_l2"] < 1.0 and 0.0 < ptq["psnr_db"] < 200
    assert len(ptq["trajectory_rel_l2"]) == len(ptq["one_step_rel_l2"]) == len(ptq["timesteps"]) == STEPS
    assert ptq["trajectory_rel_l2"][-1] == pytest.approx(ptq["rel_l2"])
    assert all(v > 0 for v in ptq["one_step_rel_l2"]) and ptq["one_step_rel_l2_by_timestep_group"]
    assert (runs / "ptq.png").stat().st_size > 1000


def test_training_lowers_rel_l2_below_ptq(ptq, trained):
    assert trained["student_kind"] == "checkpoint" and trained["student_path"].endswith(f"iter_{TRAIN_STEPS:07d}")
    assert 0.0 < trained["rel_l2"] < ptq["rel_l2"], (trained["rel_l2"], ptq["rel_l2"])
    assert trained["psnr_db"] > ptq["psnr_db"]


def test_iter_folder_and_export_evaluate_like_the_run(runs, trained):
    one = _evaluate(runs, str(runs / "run" / f"iter_{TRAIN_STEPS:07d}"), "iter")
    assert one["rel_l2"] == trained["rel_l2"]   # the run folder's latest is this checkpoint
    export = _evaluate(runs, str(runs / "export"), "export", "--recipe", RECIPE, *_overrides(runs / "data"))
    assert export["student_kind"] == "export"
    # The runtime computes in bf16 with the export's bf16 tensors; the checkpoint student in fp32.
    assert export["rel_l2"] == pytest.approx(trained["rel_l2"], rel=0.05, abs=2e-3)


def test_bad_inputs_give_one_line_errors_naming_the_path(runs, tmp_path, capsys):
    """In-process (the same entry point): every check happens before a model or a process group is made."""
    from megatron_qvgen.evaluate import main

    cases = [
        (["--teacher", str(tmp_path / "nowhere")], "ptq", str(tmp_path / "nowhere")),
        ([], str(tmp_path / "no_student"), str(tmp_path / "no_student")),
        ([], str(runs / "data"), str(runs / "data")),          # a folder that is no student
        ([], str(runs / "teacher"), str(runs / "teacher")),    # the teacher handed over as the student
    ]
    for extra, student, named in cases:
        argv = ["--teacher", str(runs / "teacher"), "--student", student, "--json", str(tmp_path / "x.json"),
                "--recipe", RECIPE, *extra]
        capsys.readouterr()
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert main(["--teacher", str(runs / "teacher"), "--student", "ptq", "--json", str(tmp_path / "x.json")]) == 2
    assert "--recipe" in capsys.readouterr().err                       # ptq without a recipe
    assert not (tmp_path / "x.json").exists()


def test_verdict_table_lists_teacher_and_students(runs, ptq, trained):
    from megatron_qvgen.fidelity.report import main

    proc = subprocess.run([sys.executable, "-m", "megatron_qvgen.fidelity.report", str(runs / "ptq.json"),
                           str(runs / "trained.json"), "--labels", "PTQ", "QVGen W4A4"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.splitlines()
    assert rows[2].startswith("teacher") and rows[3].startswith("PTQ") and rows[4].startswith("QVGen W4A4")
    assert f"{ptq['rel_l2']:.4g}" in rows[3] and f"{trained['rel_l2']:.4g}" in rows[4]
    assert main([str(runs / "nothing.json")]) == 2


@pytest.mark.parametrize("arch", ["wan", "cogvideox"])
def test_samplers_reach_the_data_with_an_exact_model(arch):
    """A model that predicts the exact velocity / v of a single data point brings the noise to that point."""
    from megatron_qvgen.fidelity.sampler import DDIMVPrediction, FlowMatchEuler
    from megatron_qvgen.training.diffusion import VPrediction

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=gen), torch.randn(2, 4, 3, 4, 4, generator=gen)
    if arch == "wan":
        sampler = FlowMatchEuler(10, shift=3.0)
        predict = lambda x, t: noise - x0  # noqa: E731 - the velocity of the straight path is constant
    else:
        sampler = DDIMVPrediction(10, snr_shift_scale=3.0)  # 1000 // 10 steps: the last lands on abar = 1
        abar = VPrediction(snr_shift_scale=3.0).alphas_cumprod()

        def predict(x, t):  # v of the DDPM path through (x0, eps(x)): eps read off the current x
            a = float(abar[t])
            eps = noise if a == 0 else (x - a ** 0.5 * x0) / (1 - a) ** 0.5
            return a ** 0.5 * eps - (1 - a) ** 0.5 * x0
    x = noise.clone()
    for k, t in enumerate(sampler.timesteps()):
        x = sampler.step(x, k, predict(x, t))
    assert torch.allclose(x, x0, atol=1e-5)
    assert len(sampler.timesteps()) == 10 and sampler.timesteps()[0] in (1000.0, 999)


def _fit_and_train(rank, world, teacher_cfg, student_cfg, teacher):
    from megatron_qvgen.training.loop import Trainer
    from megatron_qvgen.training.teacher_fit import fit_teacher

    fit_teacher(teacher_cfg, teacher, steps=20, lr=1e-3)
    Trainer(student_cfg, init_from=teacher).setup().train()
    return {}


def test_cogvideox_checkpoint_and_export_evaluate_alike(tmp_path):
    """CogVideoX: DDIM v-prediction sampling, its runtime's own argument order, classifier-free guidance."""
    from megatron_qvgen.config import apply_overrides, parse_override_args
    from megatron_qvgen.convert.to_inference import export_inference
    from megatron_qvgen.recipes import get_recipe

    data = ["--data.shards", str(tmp_path / "data"), "--data.synthesize_if_missing", "true",
            "--data.synthetic_samples", "16"]
    teacher_cfg = apply_overrides(get_recipe("tiny_cogvideox"), parse_override_args(data))
    run = str(tmp_path / "run")
    student_cfg = apply_overrides(teacher_cfg, [("train.steps", "12"), ("train.save_dir", run),
                                                ("train.log_interval", "12")])
    run_distributed(_fit_and_train, 1, teacher_cfg, student_cfg, str(tmp_path / "teacher"), timeout=600)
    export_inference(run, str(tmp_path / "export"), progress=False)
    ckpt = _evaluate(tmp_path, run, "ckpt", "--guidance-scale", "2")
    export = _evaluate(tmp_path, str(tmp_path / "export"), "export", "--guidance-scale", "2",
                       "--recipe", "tiny_cogvideox", *data)
    assert ckpt["sampler"].startswith("DDIM") and ckpt["timesteps"][0] == 999 and ckpt["guidance_scale"] == 2.0
    assert 0.0 < ckpt["rel_l2"] < 1.0
    assert export["rel_l2"] == pytest.approx(ckpt["rel_l2"], rel=0.05, abs=2e-3)
