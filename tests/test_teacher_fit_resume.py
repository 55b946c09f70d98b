"""A teacher fit cut short continues from its checkpoint to the same teacher; a changed setting is refused.

The GPU fidelity study fits its teacher in calls of at most ten minutes: a fit that is stopped must not start
over, and must not end as another teacher. Real processes (gloo), the tiny Wan recipe, fp32."""
import os

import pytest
import torch

from multiproc import run_distributed

STEPS, EVERY = 6, 3


def _cfg(data, **train):
    from megatron_qvgen.config import apply_overrides, parse_override_args
    from megatron_qvgen.recipes import get_recipe

    args = ["--data.shards", str(data), "--data.synthesize_if_missing", "true", "--data.synthetic_samples", "32",
            "--train.precision", "fp32"]
    for key, value in train.items():
        args += [f"--train.{key}", str(value)]
    return apply_overrides(get_recipe("tiny_wan"), parse_override_args(args))


def _fit(rank, world, cfg, out, checkpoint_dir, lr=1e-3):
    """Returns the log lines saying where the fit continued from."""
    import logging

    from megatron_qvgen.training.teacher_fit import fit_teacher

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("megatron_qvgen.training.teacher_fit")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    fit_teacher(cfg, out, STEPS, lr, checkpoint_dir, EVERY)
    return [line for line in said if "continuing from" in line]


def _weights(rank, world, cfg, *folders):
    from megatron_qvgen.convert.checkpoint_io import load_model
    from megatron_qvgen.models import build_model_chunks
    from megatron_qvgen.parallel import initialize_parallel

    initialize_parallel(cfg.parallel, seed=0)
    out = {}
    for i, folder in enumerate(folders):
        model = build_model_chunks(cfg.model, cfg.parallel, spec="bf16", params_dtype=torch.float32)[0]
        load_model([model], folder, cfg.model)
        out.update({f"{i}/{k}": v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)})
    return out


def test_a_stopped_fit_continues_to_the_same_teacher(tmp_path):
    data, ckpt = tmp_path / "data", tmp_path / "fit"
    cfg = _cfg(data)
    # The whole fit, keeping a checkpoint at step 3 (as a fit stopped right after it would have left).
    assert run_distributed(_fit, 1, cfg, str(tmp_path / "whole"), str(ckpt), timeout=300) == [[]]
    assert sorted(os.listdir(ckpt)) == ["iter_0000003", "latest"]
    # Started again on that checkpoint: steps 4-6 only, to the same weights.
    said = run_distributed(_fit, 1, cfg, str(tmp_path / "resumed"), str(ckpt), timeout=300)[0]
    assert len(said) == 1 and "iter_0000003 (step 3 of 6)" in said[0], said
    w = run_distributed(_weights, 1, cfg, str(tmp_path / "whole"), str(tmp_path / "resumed"), timeout=300)[0]
    names = [k[2:] for k in w if k.startswith("0/")]
    assert names
    for name in names:
        torch.testing.assert_close(w[f"1/{name}"], w[f"0/{name}"], rtol=0, atol=0, msg=name)


def test_a_fit_checkpoint_refuses_other_settings(tmp_path):
    from multiproc import DistributedTestError

    data, ckpt = tmp_path / "data", tmp_path / "fit"
    cfg = _cfg(data)
    run_distributed(_fit, 1, cfg, str(tmp_path / "whole"), str(ckpt), timeout=300)
    before = sorted(os.listdir(ckpt))
    with pytest.raises(DistributedTestError, match=r"train\.lr 0\.001 -> 0\.002.*another checkpoint folder"):
        run_distributed(_fit, 1, cfg, str(tmp_path / "other"), str(ckpt), lr=2e-3, timeout=300)
    assert not (tmp_path / "other").exists()
    assert sorted(os.listdir(ckpt)) == before
