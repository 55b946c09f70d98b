"""CogVideoX QAT training checkpoint (rank decayed to 0) -> inference folder -> qvgen_kernels runtime, against the
fake-quant megatron student at TP=1: integer codes bit-identical per linear, outputs equal up to float32 rounding
once the student's unquantised tensors are the export's bf16 values, and close in bf16.

Two tiny students: 2B-style (sin-cos positions, W4A4) and 5B-style (3D RoPE, no q/k/v bias, W3A3)."""
import dataclasses
import os

import pytest
import torch

from megatron_qvgen.convert.to_inference import export_inference
from export_checks import compare_codes, load_student, runtime_outputs, student_outputs
from multiproc import run_distributed
from numerics import max_rel_diff
from test_train_cogvideox import tiny_cogvideox_cfg
from test_trainer import _save_teacher, _train
from qvgen_kernels.format import load_export

STYLES = {"2b_w4a4": (dict(), 4), "5b_w3a3": (dict(use_rotary_positional_embeddings=True, attention_bias=False), 3)}


def _cfg(root, style):
    model_changes, bits = STYLES[style]
    cfg = tiny_cogvideox_cfg(os.path.join(root, "run"))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_changes),
                               quant=cfg.quant.with_(weight_bits=bits, act_bits=bits),
                               train=dataclasses.replace(cfg.train, save_dir=os.path.join(root, "ckpt"),
                                                         save_interval=cfg.train.steps))


def _student_and_runtime(rank, world, cfg, ckpt, export_dir):
    from qvgen_kernels.cogvideox_model import CogVideoXRuntimeTransformer

    student = load_student(cfg, ckpt)
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 2, 4, 8, 12, generator=gen)      # (B, F, C, H, W), another aspect than training's
    timestep = torch.tensor([913, 87])
    text = torch.randn(2, 8, 16, generator=gen)
    y_student, y_student_bf16 = student_outputs(student, latents, timestep, text)
    runtime = CogVideoXRuntimeTransformer.from_export(export_dir)
    y_runtime, y_runtime_fp32 = runtime_outputs(runtime, latents, text, timestep)   # diffusers' argument order
    same_weight, same_act, checked = compare_codes(student, runtime, export_dir, cfg.quant, gen)
    return {"student": y_student, "student_bf16_tensors": y_student_bf16, "runtime": y_runtime,
            "runtime_fp32": y_runtime_fp32, "same_weight": torch.tensor(same_weight),
            "same_act": torch.tensor(same_act), "checked": torch.tensor(checked)}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_cogvideox_export_runs_in_the_runtime_like_the_fake_quant_model(tmp_path, style):
    cfg = _cfg(str(tmp_path), style)
    teacher = str(tmp_path / "teacher")
    run_distributed(_save_teacher, 1, cfg, teacher)
    trained = run_distributed(_train, 1, cfg, teacher)[0]
    assert int(trained["aux_params"]) == 0, "rank decay must have removed the auxiliary module"
    out = str(tmp_path / "export")
    summary = export_inference(cfg.train.save_dir, out, progress=False)
    assert summary.step == cfg.train.steps and summary.aux_rank == 0
    assert summary.quantized == 5 + cfg.model.num_layers * 8   # text_proj, time x2, norm_out, proj_out; 8 a block
    assert (load_export(out).linears["transformer_blocks.0.attn1.to_q"].bias is None) == (style == "5b_w3a3")
    ckpt = os.path.join(cfg.train.save_dir, f"iter_{cfg.train.steps:07d}")
    r = run_distributed(_student_and_runtime, 1, cfg, ckpt, out)[0]
    assert int(r["checked"]) == summary.quantized
    assert bool(r["same_weight"]), "exported weight codes differ from the fake quantizer's"
    assert bool(r["same_act"]), "runtime activation codes differ from the fake quantizer's"
    # Exact up to float32 rounding once the student's unquantised tensors are the export's bf16 values ...
    assert max_rel_diff(r["runtime_fp32"], r["student_bf16_tensors"]) < 1e-5
    # ... and in bf16 compute as close as bf16 rounding allows at 3-4 bits (codes near a boundary can flip).
    cos = torch.nn.functional.cosine_similarity(r["runtime"].flatten(), r["student"].flatten(), dim=0)
    assert float(cos) > 0.99, float(cos)
