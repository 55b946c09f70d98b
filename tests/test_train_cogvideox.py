"""QAT distillation of a tiny CogVideoX (v-prediction, zero terminal SNR) on synthetic shards, real gloo ranks:
the same losses at world 1, TP=2 with sequence parallelism, and PP=2, and rank decay reaching 0."""
import os

import pytest
import torch

from megatron_qvgen.config import (CogVideoXConfig, DataConfig, ExperimentConfig, ParallelConfig, QuantConfig,
                                   TrainConfig)
from multiproc import run_distributed
from test_trainer import _save_teacher, _train

STEPS = 6


def tiny_cogvideox_cfg(root, tp=1, pp=1, sp=False):
    # 8 text + 2 x 4 x 4 video tokens; sin-cos positions like the 2B model.
    model = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                            time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
                            sample_frames=5, max_text_seq_length=8)
    return ExperimentConfig(
        name="tiny_cogvideox_test", model=model,
        quant=QuantConfig.for_method("qvgen", "w4a4", aux_rank=4, decay_phase_steps=1),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp),
        data=DataConfig(shards=os.path.join(os.path.dirname(root), "data"), synthesize_if_missing=True,
                        synthetic_samples=8, synthetic_samples_per_shard=4, synthetic_latent_size=(2, 8, 8),
                        num_workers=0, caption_dropout=0.25),
        train=TrainConfig(steps=STEPS, global_batch_size=2, micro_batch_size=1, precision="fp32", lr=1e-3,
                          aux_lr=1e-3, snr_shift_scale=3.0),
    )


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cogvideox")
    path = str(root / "teacher")
    run_distributed(_save_teacher, 1, tiny_cogvideox_cfg(str(root / "x")), path)
    return root, path


def _rel(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def test_losses_match_at_world1_tp2_sp_and_pp2_and_rank_decays_to_zero(teacher_ckpt):
    root, teacher = teacher_ckpt
    ref = run_distributed(_train, 1, tiny_cogvideox_cfg(str(root / "ref")), teacher)[0]
    assert ref["losses"].numel() == STEPS and bool(torch.isfinite(ref["losses"]).all())
    assert float(ref["losses"][0]) > 1e-3, "the teacher/student gap should be visible"
    assert int(ref["aux_params"]) == 0, "the auxiliary module must be gone after the last decay phase"
    assert bool(ref["teacher_frozen"]) and bool(ref["main_matches_model"])
    for world, tp, pp, sp in [(2, 2, 1, True), (2, 1, 2, False)]:
        out = run_distributed(_train, world, tiny_cogvideox_cfg(str(root / f"tp{tp}pp{pp}"), tp, pp, sp), teacher)
        losses = out[-1]["losses"]  # the last rank is on the last pipeline stage
        assert _rel(losses, ref["losses"]) < 1e-5, f"TP={tp} PP={pp} SP={sp}: {losses} vs {ref['losses']}"
        assert all(int(o["aux_params"]) == 0 and int(o["step"]) == STEPS for o in out)
