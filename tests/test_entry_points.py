"""The first hour at the command line: train / fit_teacher / tools print user errors as one line from rank 0
with a non-zero exit, ``--help`` lists the recipes, megatron's INFO chatter stays off the console."""
import os
import subprocess
import sys

import pytest

from megatron_qvgen import cli
from megatron_qvgen.config import ConfigError
from megatron_qvgen.data.errors import DatasetError
from megatron_qvgen.dist_ckpt import CheckpointError
from megatron_qvgen.recipes import recipe_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "kernels"), env.get("PYTHONPATH", "")])
    env.pop("RANK", None)
    return env


def _run(args, timeout=300):
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _train(*args):
    return _run([sys.executable, "-m", "megatron_qvgen.train", "--recipe", "tiny_wan", *args])


@pytest.mark.parametrize("args", [["--train.steps"], ["--train.steps", "--train.lr", "1e-4"]])
def test_a_flag_without_a_value_is_one_line_not_a_traceback(args):
    rc, out, err = _train(*args)
    assert rc == 2
    assert err.strip() == "error: --train.steps needs a value (--train.steps VALUE or --train.steps=VALUE)"


def test_unsupported_weight_bits_are_refused_on_one_line():
    rc, out, err = _train("--quant.weight_bits", "5")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: quant.weight_bits must be one of 2, 3, 4, got 5")


def test_help_lists_every_recipe_with_what_it_is():
    for module in ("megatron_qvgen.train", "megatron_qvgen.fit_teacher"):
        rc, out, err = _run([sys.executable, "-m", module, "--help"])
        assert rc == 0, err
        recipes = out.split("recipes:\n", 1)[1]
        for name in recipe_names():
            line = next(l for l in recipes.splitlines() if l.split()[:1] == [name])
            assert len(line.split()) > 3, line   # the name and a description
        assert "--section.field value" in out


def test_missing_shards_under_torchrun_print_one_line_from_rank_0(tmp_path):
    missing = str(tmp_path / "no_shards_here")
    rc, out, err = _run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "megatron_qvgen.train",
                         "--recipe", "tiny_wan", "--parallel.tensor_parallel", "2", "--train.steps", "14",
                         "--data.shards", missing])
    assert rc != 0
    ours = [l for l in (out + err).splitlines() if "error:" in l]
    assert len(ours) == 1 and ours[0].startswith("error: ") and missing in ours[0], out + err
    assert "[rank" not in out + err                  # no per-rank traceback, no rank > 0 line
    ours_frames = [l for l in err.splitlines() if l.lstrip().startswith(("File \"" + os.path.join(REPO, "megatron_qvgen"),
                                                                           "File \"" + os.path.join(REPO, "kernels")))]
    assert not ours_frames, err                      # torchrun's own summary (from .venv) is not ours


def test_a_user_error_is_one_line_immediately_on_rank_0_and_after_a_grace_elsewhere(capsys, monkeypatch):
    monkeypatch.setattr(cli, "NONZERO_RANK_GRACE_S", 0.0)
    cli.report_user_error(DatasetError("no .tar shards at 'x'\n(a directory)"), rank=0)
    cli.report_user_error(DatasetError("shard y is truncated"), rank=3)
    assert capsys.readouterr().err.splitlines() == ["error: no .tar shards at 'x' (a directory)",
                                                     "[rank 3] error: shard y is truncated"]


def test_run_maps_user_errors_to_exit_codes_and_keeps_tracebacks_for_bugs(capsys):
    def raise_(exc):
        def body():
            raise exc
        return body

    assert cli.run(raise_(ConfigError("train.steps must be >= 1"))) == 2
    assert cli.run(raise_(DatasetError("no .tar shards"))) == 2          # a data error is a config error
    assert cli.run(raise_(CheckpointError("iter_0000005 is incomplete"))) == 1
    assert cli.run(lambda: 0) == 0
    assert capsys.readouterr().err.splitlines() == ["error: train.steps must be >= 1", "error: no .tar shards",
                                                    "error: iter_0000005 is incomplete"]
    with pytest.raises(KeyError):   # not a user error: the traceback stays
        cli.run(raise_(KeyError("bug")))


def test_quiet_console_keeps_our_info_and_drops_megatron_info_and_noise_warnings():
    code = ("from megatron_qvgen import cli; cli.quiet_console()\n"
            "import logging, warnings\n"
            "logging.getLogger('megatron.core.distributed.param_and_grad_buffer').info('Params for bucket 1')\n"
            "logging.getLogger('megatron.core.optimizer').warning('a real megatron warning')\n"
            "logging.getLogger('megatron_qvgen.training.loop').info('our progress')\n"
            "logging.getLogger('megatron.core.dist_checkpointing.strategies.torch').warning(\n"
            "    \"MCore's async save is deprecated and will be removed\")\n"
            "logging.getLogger('torch.utils.cpp_extension').warning(\n"
            "    \"No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'\")\n"
            "warnings.warn('Transformer Engine and Apex are not installed. Falling back')\n"
            "warnings.warn('MimoModelConfig is experimental and still under active development.')\n")
    rc, out, err = _run([sys.executable, "-c", code])
    assert rc == 0, err
    assert "our progress" in err and "a real megatron warning" in err
    assert "Params for bucket" not in err and "Transformer Engine" not in err
    assert "async save" not in err and "Mimo" not in err and "No CUDA runtime" not in err


def test_a_short_run_prints_one_console_line_per_log_interval_and_no_megatron_chatter(tmp_path):
    rc, out, err = _run([TORCHRUN, "--standalone", "--nproc-per-node", "1", "-m", "megatron_qvgen.train",
                         "--recipe", "tiny_wan", "--data.shards", str(tmp_path / "data"),
                         "--data.synthesize_if_missing", "true", "--train.steps", "6", "--train.log_interval", "3",
                         "--train.eval_interval", "0", "--train.save_dir", str(tmp_path / "run")], timeout=600)
    assert rc == 0, out + err
    assert [l.split(" | ")[0] for l in out.splitlines() if l.startswith("step ")] == ["step 3/6", "step 6/6"]
    console = [l for l in out.splitlines() if l.startswith("step ")]
    assert all(" lr " in l and " aux_rank " in l and " weights " not in l for l in console), console
    # our own INFO lines (checkpoint saved, ...) stay; megatron's and other libraries' INFO chatter does not
    foreign_info = [l for l in err.splitlines() if " INFO " in l and " INFO megatron_qvgen." not in l]
    assert not foreign_info and "Params for bucket" not in err and "UserWarning" not in err, err


def test_fit_teacher_reports_missing_shards_on_one_line(tmp_path):
    missing = str(tmp_path / "no_shards_here")
    rc, out, err = _run([sys.executable, "-m", "megatron_qvgen.fit_teacher", "--recipe", "tiny_wan",
                         "--out", str(tmp_path / "teacher"), "--steps", "10", "--data.shards", missing])
    assert rc == 2                                    # a data error is a config error
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and missing in err, err
    assert not (tmp_path / "teacher").exists()


@pytest.mark.parametrize("tool, args", [
    ("diffusers_to_megatron", ["--src", "{missing}", "--dst", "{tmp}/out"]),
    ("megatron_to_diffusers", ["--src", "{missing}", "--dst", "{tmp}/out"]),
    ("export_inference", ["--src", "{missing}", "--dst", "{tmp}/out"]),
    ("verify", ["--diffusers", "{missing}", "--megatron", "{missing}"]),
])
def test_every_tool_reports_a_missing_input_on_one_line(tool, args, tmp_path):
    missing = str(tmp_path / "not_there")
    argv = [a.format(missing=missing, tmp=tmp_path) for a in args]
    rc, out, err = _run([sys.executable, os.path.join(REPO, "tools", "convert", tool + ".py"), *argv])
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and missing in err
    assert not (tmp_path / "out").exists()
