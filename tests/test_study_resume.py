"""A fidelity-study run stopped by a signal (the GPU study's deadline) continues from its checkpoint to the record
an uninterrupted run writes: losses, evaluation curve, gradient norms, ranks and the auxiliary spectrum, across a
rank-decay boundary and the module's removal. A checkpoint that is not a study run's is refused by name.
Real processes (gloo), the tiny Wan config of test_trainer, fp32."""
import os
import signal

import pytest
import torch

from multiproc import DistributedTestError, run_distributed
from test_trainer import teacher_ckpt, tiny_cfg  # noqa: F401 - teacher_ckpt: the fixture

STEPS, STOP_AT = 8, 2    # rank 4 -> 2 -> 1 -> 0 over steps 1-4 (decay_phase_steps 1): the stop is mid-decay


def _study_run(rank, world, cfg, init_from, signal_at=None, plain=False, legacy=False):
    from megatron_qvgen.fidelity.study import RecordingTrainer
    from megatron_qvgen.training.loop import Trainer

    class Legacy(RecordingTrainer):   # a study checkpoint as saved before it recorded which run it is
        def checkpoint_extras(self):
            extras = super().checkpoint_extras()
            del extras["study_record"]["teacher"]
            return extras

    base = Trainer if plain else Legacy if legacy else RecordingTrainer

    class Signalled(base):
        def _one_step(self, num_micro):
            if signal_at is not None and self.state.step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            super()._one_step(num_micro)

    trainer = (Signalled(cfg, init_from) if plain else Signalled(cfg, init_from, spectrum_interval=1)).setup()
    state = trainer.train()
    out = {"step": torch.tensor(state.step), "checkpoint": state.outcome.checkpoint or ""}
    if not plain:
        out.update({"loss": torch.tensor(state.losses, dtype=torch.float64),
                    "eval": torch.tensor(trainer.eval_curve(), dtype=torch.float64),
                    "grad_norm": torch.tensor([-1.0 if g is None else g for g in trainer.grad_norms],  # None: not logged
                                          dtype=torch.float64),
                    "rank": torch.tensor(trainer.ranks),
                    "spectrum_steps": torch.tensor(trainer.spectrum.steps),
                    "spectrum": torch.tensor(trainer.spectrum.mean_spectrum, dtype=torch.float64),
                    "share_small": torch.tensor(trainer.spectrum.share_small, dtype=torch.float64),
                    "seconds": torch.tensor(trainer.seconds_before)})
    return out


def _cfg(root, name, **train):
    fields = dict(steps=STEPS, eval_interval=2, eval_microbatches=2, keep_last=1)
    fields.update(train)
    return tiny_cfg(str(root / name), **fields)


def test_a_stopped_study_run_continues_to_the_uninterrupted_record(teacher_ckpt):
    root, init = teacher_ckpt
    ref = run_distributed(_study_run, 1, _cfg(root, "study_ref"), init)[0]
    save = str(root / "study_stopped" / "resume")
    cfg = _cfg(root, "study_stopped", save_dir=save, save_interval=2)   # a save at step 2 records nothing
    first = run_distributed(_study_run, 1, cfg, init, signal_at=STOP_AT)[0]
    assert int(first["step"]) == STOP_AT + 1 and first["checkpoint"].endswith(f"iter_{STOP_AT + 1:07d}")
    second = run_distributed(_study_run, 1, cfg, init)[0]
    assert int(second["step"]) == STEPS and second["checkpoint"] == ""   # a finished run saves nothing more
    assert float(second["seconds"]) > 0                                  # the first call's training time counted
    assert ref["rank"].tolist() == second["rank"].tolist() and ref["rank"].tolist()[-1] == 0
    for key in ("loss", "eval", "grad_norm", "spectrum_steps", "spectrum", "share_small"):
        assert ref[key].shape == second[key].shape, key
        assert torch.equal(ref[key], second[key]), f"{key} differs after the stop"
    assert sorted(os.listdir(save)) == ["iter_0000006", "latest"]   # the last interval save (none at the finish)


def test_a_checkpoint_without_a_study_record_is_refused_by_name(teacher_ckpt):
    root, init = teacher_ckpt
    save = str(root / "plain_run" / "ckpt")
    cfg = _cfg(root, "plain_run", save_dir=save)
    run_distributed(_study_run, 1, cfg, init, signal_at=STOP_AT, plain=True)
    with pytest.raises(DistributedTestError, match="iter_0000003 holds no study record"):
        run_distributed(_study_run, 1, cfg, init)
    assert sorted(os.listdir(save)) == ["iter_0000003", "latest"]        # nothing of the plain run removed
    done = _cfg(root, "plain_done", save_dir=str(root / "plain_done" / "ckpt"))
    run_distributed(_study_run, 1, done, init, plain=True)              # finished: its final checkpoint saved
    with pytest.raises(DistributedTestError, match=f"iter_{STEPS:07d} is already at step {STEPS} of {STEPS}"):
        run_distributed(_study_run, 1, done, init)


def test_a_stop_signal_during_the_measurement_is_ignored_then_the_handlers_return():
    from megatron_qvgen.fidelity.study import _stop_signals_ignored

    seen = []
    before = signal.signal(signal.SIGUSR1, lambda *_: seen.append("usr1"))
    try:
        with _stop_signals_ignored():
            os.kill(os.getpid(), signal.SIGUSR1)     # the measurement goes on to its record
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == ["usr1"]                     # the run's own handler is back
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_checkpoint_of_another_run_or_a_spent_one_is_refused_by_name(teacher_ckpt):
    from megatron_qvgen.fidelity.study import mark_finished

    root, init = teacher_ckpt
    save = str(root / "study_other" / "resume")
    cfg = _cfg(root, "study_other", save_dir=save)
    run_distributed(_study_run, 1, cfg, init, signal_at=STOP_AT)
    longer = _cfg(root, "study_other", save_dir=save, steps=STEPS + 4)   # the trainer alone would splice the two
    with pytest.raises(DistributedTestError, match=r"iter_0000003 is the checkpoint of another run \(it differs in "
                                                   r"train.steps\)"):
        run_distributed(_study_run, 1, longer, init)
    assert int(run_distributed(_study_run, 1, cfg, init)[0]["step"]) == STEPS   # its own config continues it
    mark_finished(save, str(root / "study_other.json"))                        # the record is written
    with pytest.raises(DistributedTestError, match="resume holds the checkpoint of a run already continued"):
        run_distributed(_study_run, 1, cfg, init)
    assert sorted(os.listdir(save)) == ["finished.json", "iter_0000003", "latest"]   # nothing removed
    older = _cfg(root, "study_older", save_dir=str(root / "study_older" / "resume"))
    run_distributed(_study_run, 1, older, init, signal_at=STOP_AT, legacy=True)
    with pytest.raises(DistributedTestError, match="iter_0000003 does not say which run it is"):
        run_distributed(_study_run, 1, older, init)


def test_the_runner_moves_a_spent_checkpoint_aside_and_starts_the_run_over(tmp_path, monkeypatch):
    from scripts import load_script

    runner = load_script("benchmarks/fidelity/run_study.py")
    spent = tmp_path / "out" / "resume" / "w4a4_lsq_s0"
    spent.mkdir(parents=True)
    (spent / "finished.json").write_text("{}")
    (spent / "latest").write_text("iter_0000003")
    queued = []
    monkeypatch.setattr(runner, "run_queue", lambda queue, jobs, deadline: (queued.extend(queue), ([], []))[1])
    args, rest = runner.parse_args(["--teacher", "T", "--recipe", "tiny_wan", "--data", "D", "--out",
                                    str(tmp_path / "out"), "--methods", "lsq", "--bits", "w4a4", "--seeds", "0"])
    runner.run_all(args, rest)
    assert len(queued) == 1 and str(spent) in queued[0][1]
    assert not spent.exists()
    moved = list(spent.parent.glob("w4a4_lsq_s0.spent-*"))
    assert len(moved) == 1 and (moved[0] / "latest").read_text() == "iter_0000003"   # kept, not deleted


def _signal_after_training(rank, world, cfg, init_from):
    from megatron_qvgen.fidelity.pipeline import EvalOptions
    from megatron_qvgen.fidelity.study import RecordingTrainer, run_study

    release = RecordingTrainer._release

    def release_then_signal(self):   # the deadline's SIGTERM just after training ended, before the measurement
        release(self)
        os.kill(os.getpid(), signal.SIGTERM)

    RecordingTrainer._release = release_then_signal
    record = run_study(init_from, cfg, "qvgen", EvalOptions(samples=1, sampling_steps=2, seed=0), 1)
    return {"steps": torch.tensor(record["train"]["steps"]), "rel_l2": torch.tensor(record["fidelity"]["rel_l2"])}


def test_a_stop_signal_between_training_and_measurement_does_not_lose_the_training(teacher_ckpt):
    root, init = teacher_ckpt
    out = run_distributed(_signal_after_training, 1, _cfg(root, "study_late_signal"), init)[0]
    assert int(out["steps"]) == STEPS and float(out["rel_l2"]) > 0


def test_a_stop_signal_while_the_record_is_written_does_not_lose_it(tmp_path, monkeypatch):
    import json

    import megatron_qvgen.fidelity.session as session
    import megatron_qvgen.fidelity.study as study

    def killed(*_):
        raise RuntimeError("the stop signal reached the run before its record was written")

    record = {"fidelity": {"rel_l2": 0.1, "psnr_db": 20.0}, "bits": "w4a4", "seconds": 1.0}
    monkeypatch.setattr(session, "open_single_process", lambda seed: None)
    monkeypatch.setattr(session, "close_single_process", lambda: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(study, "run_study", lambda *args: dict(record))
    before = signal.signal(signal.SIGTERM, killed)   # the default would end pytest itself
    try:
        out = tmp_path / "run.json"
        assert study.main(["--teacher", "T", "--recipe", "tiny_wan", "--method", "lsq", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["fidelity"]["rel_l2"] == 0.1
        assert signal.getsignal(signal.SIGTERM) is killed   # handed back once the record is on disk
    finally:
        signal.signal(signal.SIGTERM, before)
