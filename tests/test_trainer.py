"""The distillation trainer on a tiny Wan, real gloo ranks: layouts agree, crashes resume exactly, bad
losses are handled, the teacher stays frozen and out of checkpoints, TensorBoard has the figures."""
import os
import random
import signal

import pytest
import torch

from megatron_qvgen.config import (DataConfig, ExperimentConfig, ParallelConfig, QuantConfig, TrainConfig,
                                   WanConfig)
from multiproc import DistributedTestError, run_distributed

STEPS = 10


def tiny_cfg(root, tp=1, pp=1, steps=STEPS, precision="fp32", **train):
    model = WanConfig(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=2, text_dim=16,
                      freq_dim=16, in_channels=4, out_channels=4, text_len=8)
    train_fields = dict(steps=steps, global_batch_size=2, micro_batch_size=1, precision=precision,
                        tensorboard_dir=os.path.join(root, "tb"), lr=1e-3, aux_lr=1e-3)
    train_fields.update(train)
    return ExperimentConfig(
        name="tiny", model=model,
        quant=QuantConfig.for_method("qvgen", "w4a4", aux_rank=4, decay_phase_steps=1),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp),
        data=DataConfig(shards=os.path.join(os.path.dirname(root), "data"), synthesize_if_missing=True,
                        synthetic_samples=16, synthetic_samples_per_shard=4, synthetic_latent_size=(2, 8, 8),
                        num_workers=0, caption_dropout=0.25),
        train=TrainConfig(**train_fields),
    )


def _save_teacher(rank, world, cfg, path):
    """The full-precision weights every run starts from (what tools/convert writes)."""
    from megatron_qvgen.dist_ckpt import save_sharded
    from megatron_qvgen.models import build_model_chunks
    from megatron_qvgen.parallel import initialize_parallel

    initialize_parallel(cfg.parallel, seed=cfg.train.seed)
    torch.manual_seed(7)
    chunks = build_model_chunks(cfg.model, cfg.parallel, spec="bf16")
    with torch.no_grad():
        for p in chunks[0].parameters():  # O(1) outputs, so that the distillation loss means something
            p.normal_(std=0.3)
    save_sharded({"model": chunks[0].sharded_state_dict()}, path)
    return {}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    path = str(root / "teacher")
    run_distributed(_save_teacher, 1, tiny_cfg(str(root / "x")), path)
    return root, path


def _gathered_student(trainer):
    """This rank's student tensors by name (TP=1, PP=1 runs: the whole model)."""
    raw = trainer.opt.chunks[0].module
    return {n: p.detach().clone() for n, p in raw.named_parameters()}


def _train(rank, world, cfg, init_from, kill_at=None, nan_steps=(), sigterm_at=None, loss_file=None):
    import megatron_qvgen.training.loop as loop
    from megatron_qvgen.training.loop import Trainer

    if nan_steps:
        make = loop.make_microbatches

        def poisoned(batches, objective, *, step, **kw):
            micro = make(batches, objective, step=step, **kw)
            if step in nan_steps:
                micro[0]["latents"] = torch.full_like(micro[0]["latents"], float("nan"))
            return micro

        loop.make_microbatches = poisoned

    class Probe(Trainer):
        def _one_step(self, num_micro):
            if kill_at is not None and self.state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if sigterm_at is not None and self.state.step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            super()._one_step(num_micro)
            if loss_file and self.state.losses and rank == world - 1:
                with open(loss_file, "a") as f:
                    f.write(f"{self.state.step} {self.state.losses[-1]!r}\n")

    trainer = Probe(cfg, init_from=init_from).setup()
    frozen = all(not p.requires_grad for c in trainer.teacher for p in c.parameters())
    state = trainer.train()
    out = {
        "losses": torch.tensor(state.losses, dtype=torch.float64),
        "step": torch.tensor(state.step),
        "skipped": torch.tensor(state.nonfinite_skipped),
        "teacher_frozen": torch.tensor(frozen and all(p.grad is None for c in trainer.teacher for p in c.parameters())),
        "aux_params": torch.tensor(sum("aux_" in n for c in trainer.opt.chunks for n, _ in c.named_parameters())),
    }
    if world == 1:
        out["weights"] = _gathered_student(trainer)
        out["main_matches_model"] = torch.tensor(_main_matches_model(trainer))
    return out


def _main_matches_model(trainer):
    from megatron_qvgen.training.optimizer import MegatronOptimizerAdapter

    adapter = MegatronOptimizerAdapter(trainer.opt.optimizer)
    for chunk in trainer.opt.chunks:
        for p in chunk.parameters():
            main = adapter.full_master(p)
            if main is None or not torch.equal(main.to(p.dtype), p.detach()):
                return False
    return True


def _rel(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def test_losses_match_at_world1_tp2_pp2_dp2(teacher_ckpt):
    root, teacher = teacher_ckpt
    ref = run_distributed(_train, 1, tiny_cfg(str(root / "ref")), teacher)[0]
    assert ref["losses"].numel() == STEPS and bool(torch.isfinite(ref["losses"]).all())
    assert float(ref["losses"][0]) > 1e-3, "the teacher/student gap should be visible"
    for world, tp, pp in [(2, 2, 1), (2, 1, 2), (2, 1, 1)]:  # the last is DP=2: one micro-batch per rank
        out = run_distributed(_train, world, tiny_cfg(str(root / f"w{world}tp{tp}pp{pp}"), tp, pp), teacher)
        losses = out[-1]["losses"]  # last rank is on the last pipeline stage
        assert _rel(losses, ref["losses"]) < 1e-5, f"world={world} TP={tp} PP={pp}: {losses} vs {ref['losses']}"
        assert all(int(o["aux_params"]) == 0 for o in out)


def test_sigkill_then_resume_equals_uninterrupted_run(teacher_ckpt):
    root, teacher = teacher_ckpt
    full = run_distributed(_train, 1, tiny_cfg(str(root / "full")), teacher)[0]
    kill_at = random.Random(2026).randint(4, STEPS - 2)
    run_dir = str(root / "killed")
    cfg = tiny_cfg(run_dir, save_dir=os.path.join(run_dir, "ckpt"), save_interval=3)
    loss_file = os.path.join(run_dir, "losses.txt")
    os.makedirs(run_dir, exist_ok=True)
    with pytest.raises(DistributedTestError):
        run_distributed(_train, 1, cfg, teacher, kill_at=kill_at, loss_file=loss_file)
    resumed = run_distributed(_train, 1, cfg, teacher, loss_file=loss_file)[0]
    # every step's loss, before the kill and after the resume, is the uninterrupted run's
    seen = {}
    for line in open(loss_file):
        step, loss = line.split()
        seen[int(step)] = float(loss)  # steps redone after the resume overwrite the killed run's
    assert sorted(seen) == list(range(1, STEPS + 1))
    assert torch.equal(torch.tensor([seen[s] for s in range(1, STEPS + 1)], dtype=torch.float64), full["losses"])
    for name, tensor in full["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), f"{name} differs after kill + resume"


def test_resume_at_another_tp_and_pp(teacher_ckpt):
    root, teacher = teacher_ckpt
    full = run_distributed(_train, 1, tiny_cfg(str(root / "full2")), teacher)[0]
    for world, tp, pp in [(2, 2, 1), (2, 1, 2)]:
        run_dir = str(root / f"reshard_tp{tp}pp{pp}")
        save = os.path.join(run_dir, "ckpt")
        first = tiny_cfg(run_dir, save_dir=save, save_interval=4)
        with pytest.raises(DistributedTestError):
            run_distributed(_train, 1, first, teacher, kill_at=6)
        second = tiny_cfg(run_dir, tp, pp, save_dir=save, save_interval=4)
        out = run_distributed(_train, world, second, teacher)[-1]
        assert int(out["step"]) == STEPS
        # steps 5.. ran at the new layout from the TP=1 checkpoint of step 4
        assert _rel(out["losses"], full["losses"][4:]) < 1e-5


def test_full_schedule_bf16_teacher_frozen_main_params_and_tensorboard(teacher_ckpt):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_qvgen.dist_ckpt import COMPLETE_MARKER

    root, teacher = teacher_ckpt
    run_dir = str(root / "bf16")
    save = os.path.join(run_dir, "ckpt")
    out = run_distributed(_train, 1, tiny_cfg(run_dir, precision="bf16", save_dir=save, image_interval=5,
                                              eval_interval=5, eval_microbatches=2), teacher)[0]
    assert bool(out["teacher_frozen"]), "the teacher received gradients"
    assert int(out["aux_params"]) == 0 and not any("aux_" in n for n in out["weights"])
    assert bool(out["main_matches_model"]), "optimizer main params and model params disagree after rank decay"
    # the checkpoint holds the student only: one copy of each weight, with its quantizer tensors
    from megatron.core.dist_checkpointing import load_tensors_metadata

    final = os.path.join(save, f"iter_{STEPS:07d}")
    assert os.path.isfile(os.path.join(final, COMPLETE_MARKER))
    keys = set(load_tensors_metadata(final))
    model_keys = {k for k in keys if k.startswith(("blocks.", "patch_embedding", "condition_embedder", "proj_out",
                                                   "norm_out", "scale_shift_table"))}
    assert any("weight_quantizer.scale" in k for k in model_keys)
    assert not any(k.startswith("teacher") for k in keys)
    assert len([k for k in model_keys if k.endswith("attn1.to_q.weight")]) == 2  # one per block, not two models
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss", "eval/loss", "grad_norm", "lr/weights", "lr/clip_logits", "aux/rank", "aux/gate",
                "throughput/samples_per_s", "throughput/tflops_per_gpu", "memory/peak_gib", "data/bad_samples"):
        assert tag in tags, f"missing TensorBoard scalar {tag}"
    ranks = [e.value for e in acc.Scalars("aux/rank")]
    assert ranks[:4] == [4, 2, 1, 0] and ranks[-1] == 0  # T = 1: one phase per step
    losses = [e.value for e in acc.Scalars("loss")]
    assert len(losses) == STEPS and all(l == pytest.approx(float(x), rel=1e-6) for l, x in zip(losses, out["losses"]))
    assert "samples/data|teacher|student_x0" in set(acc.Tags()["images"])
    image = acc.Images("samples/data|teacher|student_x0")[-1]
    assert image.height >= 128 and image.width > 2 * image.height  # three legible frames side by side


def test_nonfinite_losses_are_skipped_then_stop_with_checkpoint_intact(teacher_ckpt):
    from megatron_qvgen.training.checkpointing import latest_checkpoint

    root, teacher = teacher_ckpt
    run_dir = str(root / "nan")
    save = os.path.join(run_dir, "ckpt")
    cfg = tiny_cfg(run_dir, save_dir=save, save_interval=2, max_consecutive_nonfinite=2)
    out = run_distributed(_train, 1, cfg, teacher, nan_steps=(2,))[0]
    assert int(out["skipped"]) == 1 and int(out["step"]) == STEPS
    assert bool(torch.isfinite(out["losses"][[0, 1] + list(range(3, STEPS))]).all())
    run_dir2 = str(root / "nan2")
    save2 = os.path.join(run_dir2, "ckpt")
    cfg2 = tiny_cfg(run_dir2, save_dir=save2, save_interval=2, max_consecutive_nonfinite=2)
    with pytest.raises(DistributedTestError, match=r"3 consecutive non-finite losses at step 6 .*iter_0000006 is intact"):
        run_distributed(_train, 1, cfg2, teacher, nan_steps=(4, 5, 6, 7))
    # skipped steps leave the weights alone, so the checkpoint written during the streak is good
    last = latest_checkpoint(save2)
    assert last is not None and last.endswith("iter_0000006")
    # the checkpoint keeps the streak (steps 4 and 5): one more non-finite step after resuming is the third
    with pytest.raises(DistributedTestError, match=r"3 consecutive non-finite losses at step 6 "):
        run_distributed(_train, 1, cfg2, teacher, nan_steps=(6,))
    resumed = run_distributed(_train, 1, cfg2, teacher)[0]
    assert int(resumed["step"]) == STEPS and bool(torch.isfinite(resumed["losses"]).all())


def test_sigterm_checkpoints_and_stops(teacher_ckpt):
    root, teacher = teacher_ckpt
    run_dir = str(root / "sigterm")
    save = os.path.join(run_dir, "ckpt")
    out = run_distributed(_train, 1, tiny_cfg(run_dir, save_dir=save), teacher, sigterm_at=3)[0]
    assert int(out["step"]) == 4  # the signalled step finishes, then the run saves and stops
    assert os.path.isdir(os.path.join(save, "iter_0000004"))


def _overfit(rank, world, cfg, init_from, steps):
    """Train on one fixed global batch with fixed noise: the student must close the gap to the teacher."""
    import itertools

    import megatron_qvgen.training.loop as loop
    from megatron_qvgen.training.diffusion import noise_generator
    from megatron_qvgen.training.loop import Trainer

    loop.make_microbatches.__globals__["noise_generator"] = lambda seed, step, i: noise_generator(seed, 0, i)
    trainer = Trainer(cfg, init_from=init_from).setup()
    fixed = [next(trainer.loader) for _ in range(cfg.train.num_microbatches(1))]
    batches = itertools.cycle(fixed)

    class FixedLoader:
        bad_samples = {}

        def __next__(self):
            return next(batches)

    trainer.loader = FixedLoader()
    for _ in range(steps):
        trainer._one_step(len(fixed))
    return {"losses": torch.tensor(trainer.state.losses, dtype=torch.float64)}


def test_student_closes_the_gap_on_a_fixed_batch(teacher_ckpt):
    from megatron_qvgen.config import QuantConfig

    root, teacher = teacher_ckpt
    cfg = tiny_cfg(str(root / "overfit"), steps=30)
    import dataclasses

    cfg = dataclasses.replace(cfg, quant=QuantConfig.for_method("lsq", "w4a8"))
    losses = run_distributed(_overfit, 1, cfg, teacher, 25)[0]["losses"]
    # 4-bit weights leave an error floor (measured: 0.121 -> 0.038, 3.1x; W8 weights, which reached 4x, are not
    # a supported width: config.quant.WEIGHT_BITS)
    assert float(losses[-3:].mean()) < float(losses[:3].mean()) / 2.5, losses
