"""Signals during set-up, a step and a save each end with a resumable run; time-based saves and stops are
rank 0's decision on every rank; TensorBoard does not repeat redone steps; throughput leaves saves out."""
import os
import signal
import time

import pytest
import torch

from multiproc import DistributedTestError, run_distributed
from test_trainer import teacher_ckpt, tiny_cfg  # noqa: F401 - teacher_ckpt: the fixture

STEPS = 8



def _train(rank, world, cfg, init_from, signal_at=None, signal_in_setup=False, signal_in_save=None,
           kill_in_save=None, rank_signalled=0, clock_at=None, save_sleep=0.0):
    """One run of the trainer with faults injected at exact points (real signals to this process).

    signal_at: SIGUSR1 at the start of that step; signal_in_setup: SIGTERM while the data loader is built;
    signal_in_save / kill_in_save: SIGTERM / SIGKILL while the checkpoint of that step is being written;
    clock_at: (step, "exit" | "save"): move rank 0's clock an hour on at that step."""
    import megatron_qvgen.dist_ckpt as dist_ckpt
    import megatron_qvgen.training.checkpointing as ckpt
    from megatron_qvgen.training.loop import Trainer

    mark = dist_ckpt._mark_and_rename

    def marking(staging, path):
        step = int(os.path.basename(path).split("_")[1])
        if step == kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == signal_in_save:
            os.kill(os.getpid(), signal.SIGTERM)
        mark(staging, path)

    dist_ckpt._mark_and_rename = marking
    if save_sleep:
        save = ckpt.save_checkpoint

        def slow(*args, **kwargs):
            time.sleep(save_sleep)
            return save(*args, **kwargs)

        ckpt.save_checkpoint = slow

    class Faulty(Trainer):
        def _build_loader(self):
            if signal_in_setup:
                os.kill(os.getpid(), signal.SIGTERM)
            return super()._build_loader()

        def _one_step(self, num_micro):
            if signal_at is not None and self.state.step == signal_at and rank == rank_signalled:
                os.kill(os.getpid(), signal.SIGUSR1)
            if clock_at is not None and self.state.step == clock_at[0]:
                if clock_at[1] == "exit":
                    self.clock.started -= 3600
                else:
                    self.clock.last_save -= 3600
            super()._one_step(num_micro)

    trainer = Faulty(cfg, init_from=init_from).setup()
    state = trainer.train()
    raw = trainer.opt.chunks[0].module
    return {"step": torch.tensor(state.step), "exit": torch.tensor(state.outcome.exit_code),
            "line": state.outcome.line(), "resumed_from": trainer.resumed_from or "",
            "weights": {n: p.detach().clone() for n, p in raw.named_parameters()}}


def _cfg(root, name, **train):
    run = str(root / name)
    fields = dict(steps=STEPS, save_dir=os.path.join(run, "ckpt"), keep_last=0)
    fields.update(train)
    return tiny_cfg(run, **fields), os.path.join(run, "ckpt")


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()


def test_signal_during_a_step_then_during_setup_then_a_clean_finish(teacher_ckpt):
    root, init = teacher_ckpt
    ref = run_distributed(_train, 2, _cfg(root, "ref")[0], init)          # DP = 2, uninterrupted
    cfg, save = _cfg(root, "step")
    # SIGUSR1 on rank 1 only, at the start of step 4: every rank finishes it, saves step 4 and stops
    first = run_distributed(_train, 2, cfg, init, signal_at=3, rank_signalled=1)
    assert [int(o["step"]) for o in first] == [4, 4] and [int(o["exit"]) for o in first] == [75, 75]
    assert "stopped to be requeued (SIGUSR1): step 4/8, checkpoint" in first[0]["line"]
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000004"
    # SIGTERM while the resumed run builds its data loader: no new step, nothing new to save, stopped
    second = run_distributed(_train, 2, cfg, init, signal_in_setup=True)
    assert [int(o["step"]) for o in second] == [4, 4] and int(second[0]["exit"]) == 75
    assert second[0]["line"].endswith("a rerun continues from it (exit status 75)")
    assert sorted(os.listdir(save)) == ["iter_0000004", "latest"]
    third = run_distributed(_train, 2, cfg, init)
    assert int(third[0]["exit"]) == 0 and int(third[0]["step"]) == STEPS
    for rank in range(2):
        assert _same_weights(third[rank]["weights"], ref[rank]["weights"]), "interrupted run differs"


def test_signal_during_a_save_and_a_kill_during_a_save(teacher_ckpt):
    root, init = teacher_ckpt
    cfg, save = _cfg(root, "save", save_interval=3)
    # SIGTERM while step 3's checkpoint is being written: the save completes, then the run stops
    first = run_distributed(_train, 1, cfg, init, signal_in_save=3)[0]
    assert int(first["step"]) == 3 and int(first["exit"]) == 75
    assert sorted(os.listdir(save)) == ["iter_0000003", "latest"]
    # SIGKILL while step 6's is being written: latest still names step 3, the leftover is cleaned up
    with pytest.raises(DistributedTestError):
        run_distributed(_train, 1, cfg, init, kill_in_save=6)
    assert "iter_0000006.incomplete" in os.listdir(save) and "run.lock" in os.listdir(save)
    third = run_distributed(_train, 1, cfg, init)[0]
    assert third["resumed_from"].endswith("iter_0000003") and int(third["step"]) == STEPS
    assert sorted(os.listdir(save)) == ["iter_0000003", "iter_0000006", "iter_0000008", "latest"]


def _poll(rank, world, started_ago, saved_ago, exit_after, save_every):
    from megatron_qvgen.parallel import initialize_parallel
    from megatron_qvgen.config import ParallelConfig
    from megatron_qvgen.training.run_control import RunClock, StopSignals

    initialize_parallel(ParallelConfig())
    now = time.monotonic()
    clock = RunClock(save_every, exit_after, StopSignals(), now - started_ago[rank], is_rank0=rank == 0)
    clock.last_save = now - saved_ago[rank]
    d = clock.poll()
    return {"stop": d.stop or "", "save": torch.tensor(d.save)}


def test_time_based_save_and_stop_are_rank_0s_decision_on_every_rank():
    # rank 1's clock says an hour has passed, rank 0's says a second: nobody stops or saves
    out = run_distributed(_poll, 2, [1, 3600], [1, 3600], 30.0, 10.0)
    assert all(o["stop"] == "" and not bool(o["save"]) for o in out)
    # rank 0's says so: every rank stops (or saves)
    out = run_distributed(_poll, 2, [3600, 1], [1, 1], 30.0, 10.0)
    assert all(o["stop"] == "train.exit_after_minutes=30 reached" for o in out)
    out = run_distributed(_poll, 2, [1, 1], [3600, 1], 30.0, 10.0)
    assert all(o["stop"] == "" and bool(o["save"]) for o in out)


def test_time_based_save_and_exit_in_a_run(teacher_ckpt):
    root, init = teacher_ckpt
    cfg, save = _cfg(root, "clock", save_interval_minutes=30.0, exit_after_minutes=600.0)
    out = run_distributed(_train, 1, cfg, init, clock_at=(2, "save"))[0]   # 30 min "pass" during step 3
    assert int(out["exit"]) == 0 and "iter_0000003" in os.listdir(save)
    cfg, save = _cfg(root, "clock2", exit_after_minutes=30.0)
    out = run_distributed(_train, 1, cfg, init, clock_at=(4, "exit"))[0]   # an hour "passes" during step 5
    assert int(out["step"]) == 5 and int(out["exit"]) == 75
    assert "stopped to be requeued (train.exit_after_minutes=30 reached): step 5/8" in out["line"]
    assert sorted(os.listdir(save)) == ["iter_0000005", "latest"]


def test_tensorboard_after_a_kill_and_throughput_without_save_time(teacher_ckpt):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, init = teacher_ckpt
    cfg, save = _cfg(root, "tb", save_interval=3)
    with pytest.raises(DistributedTestError):
        run_distributed(_train, 1, cfg, init, kill_in_save=6)   # logged steps 1-6, checkpoint of 3 only
    run_distributed(_train, 1, cfg, init, save_sleep=2.0)        # redoes 4-8, each save 2 s slower
    acc = EventAccumulator(str(root / "tb" / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == list(range(1, STEPS + 1)), steps
    saves = {e.step: e.value for e in acc.Scalars("checkpoint/save_seconds")}
    assert set(saves) == {3, 6, 8} and saves[6] >= 2.0
    per_step = [cfg.train.global_batch_size / e.value for e in acc.Scalars("throughput/samples_per_s") if e.step == 7]
    assert per_step and per_step[0] < 2.0, "the 2 s save after step 6 was counted as training time"
