"""QAT training checkpoint -> standalone inference folder -> qvgen_kernels runtime, against the fake-quant
megatron model at TP=1; integer codes bit-identical to the fake quantizer's; live auxiliary module refused."""
import os

import pytest
import torch

from megatron_qvgen.convert.to_inference import AuxiliaryModuleNotDecayed, export_inference
from multiproc import run_distributed
from numerics import max_rel_diff
from export_checks import compare_codes, load_student, runtime_outputs, student_outputs
from test_trainer import _save_teacher, _train, tiny_cfg
from qvgen_kernels.format import load_export
from scripts import load_script


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    teacher = str(root / "teacher")
    run_distributed(_save_teacher, 1, tiny_cfg(str(root / "x")), teacher)
    run_dir = str(root / "run")
    save = os.path.join(run_dir, "ckpt")
    cfg = tiny_cfg(run_dir, steps=6, save_dir=save, save_interval=2, keep_last=0)  # the tests read step 2 too
    run_distributed(_train, 1, cfg, teacher)
    return root, cfg, save


def _student_and_runtime(rank, world, cfg, ckpt, export_dir):
    """The trained student (fake quantisation, megatron, TP=1) and the runtime on the same inputs."""
    from qvgen_kernels.wan_model import WanRuntimeTransformer

    student = load_student(cfg, ckpt)
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 2, 8, 8, generator=gen)
    timestep = torch.tensor([913.7, 87.2])
    text = torch.randn(2, 8, 16, generator=gen)
    y_student, y_student_bf16 = student_outputs(student, latents, timestep, text)
    runtime = WanRuntimeTransformer.from_export(export_dir)
    y_runtime, y_runtime_fp32 = runtime_outputs(runtime, latents, timestep, text)
    same_weight, same_act, _ = compare_codes(student, runtime, export_dir, cfg.quant, gen)
    return {"student": y_student, "student_bf16_tensors": y_student_bf16, "runtime": y_runtime,
            "runtime_fp32": y_runtime_fp32, "same_weight": torch.tensor(same_weight),
            "same_act": torch.tensor(same_act)}


def test_export_runs_in_the_runtime_like_the_fake_quant_model(trained, tmp_path):
    root, cfg, save = trained
    out = str(tmp_path / "export")
    summary = export_inference(save, out, progress=False)
    assert summary.step == 6 and summary.aux_rank == 0 and summary.quantized > 0
    r = run_distributed(_student_and_runtime, 1, cfg, os.path.join(save, "iter_0000006"), out)[0]
    assert bool(r["same_weight"]), "exported weight codes differ from the fake quantizer's"
    assert bool(r["same_act"]), "runtime activation codes differ from the fake quantizer's"
    # Exact up to float32 rounding once the student's unquantised tensors are the export's bf16 values ...
    assert max_rel_diff(r["runtime_fp32"], r["student_bf16_tensors"]) < 1e-5
    # ... and in bf16 compute the outputs agree as well as bf16 rounding allows at W4A4: activations that land
    # near a code boundary can flip (measured here: rel. max diff ~0.1; the fake-quant student itself moves
    # ~0.12 when its unquantised tensors are rounded to bf16).
    cos = torch.nn.functional.cosine_similarity(r["runtime"].flatten(), r["student"].flatten(), dim=0)
    assert float(cos) > 0.99, float(cos)


def test_live_auxiliary_module_is_refused_unless_kept(trained, tmp_path):
    root, cfg, save = trained
    early = os.path.join(save, "iter_0000002")  # T = 1: rank 2 after two steps
    with pytest.raises(AuxiliaryModuleNotDecayed, match="still holds the auxiliary module at rank 2"):
        export_inference(early, str(tmp_path / "refused"), progress=False)
    assert not (tmp_path / "refused").exists()
    s = export_inference(early, str(tmp_path / "kept"), keep_aux=True, progress=False)
    assert s.aux_rank == 2
    export = load_export(str(tmp_path / "kept"))
    assert all(l.aux_left is not None and l.aux_left.shape[1] == 2 for l in export.linears.values())
    with pytest.raises(FileExistsError):
        export_inference(early, str(tmp_path / "kept"), keep_aux=True, progress=False)


def _tool(name):
    return load_script(f"tools/convert/{name}.py")


def test_export_cli_keeps_the_users_umask_and_asks_for_overwrite(trained, tmp_path, capsys):
    root, cfg, save = trained
    export = _tool("export_inference")
    dst = tmp_path / "cli" / "w4a4"
    old = os.umask(0o027)
    try:
        assert export.main(["--src", save, "--dst", str(dst), "--no-progress"]) == 0
    finally:
        os.umask(old)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in dst.iterdir()} == {
        "model.safetensors": "0o640", "config.json": "0o640", "quantization_config.json": "0o640"}
    assert oct(dst.stat().st_mode & 0o777) == "0o750"
    capsys.readouterr()
    assert export.main(["--src", save, "--dst", str(dst), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {dst} already holds an export (model.safetensors, config.json, quantization_config.json);"
                   " add --overwrite to replace it (overwrite=True from Python)")
    assert export.main(["--src", save, "--dst", str(dst), "--no-progress", "--overwrite"]) == 0


def test_export_cli_says_a_missing_source_does_not_exist(tmp_path, capsys):
    export = _tool("export_inference")
    missing = tmp_path / "runs" / "nope"
    assert export.main(["--src", str(missing), "--dst", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {missing} does not exist"
    assert not (tmp_path / "out").exists()
