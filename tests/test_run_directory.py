"""A run directory has one writer, keeps `latest` and the newest checkpoints, survives a pointer to a
missing folder and leftovers of killed saves, and a requeued run continues its own work before load_dir."""
import json
import os
import socket
import subprocess

import pytest
import torch

from megatron_qvgen.dist_ckpt import COMPLETE_MARKER
from megatron_qvgen.training.checkpointing import latest_checkpoint
from megatron_qvgen.training.retention import complete_checkpoints, prune, remove_stale_saves
from megatron_qvgen.training.run_lock import LOCK_NAME, RunDirectoryLocked, RunLock
from multiproc import DistributedTestError, run_distributed
from test_trainer import teacher_ckpt, tiny_cfg  # noqa: F401 - teacher_ckpt: the fixture


def _fake_checkpoint(save_dir, step, complete=True):
    path = os.path.join(save_dir, f"iter_{step:07d}")
    os.makedirs(path)
    if complete:
        open(os.path.join(path, COMPLETE_MARKER), "w").write("ok\n")
    return path


def _write_lock(save_dir, **holder):
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, LOCK_NAME), "w") as f:
        json.dump(holder, f)


# ---------------------------------------------------------------------------------------- lock
def test_lock_refuses_a_second_writer_and_takes_over_stale_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = str(tmp_path / "run")
    holder = subprocess.Popen(["sleep", "60"])   # a live writer on this host
    try:
        _write_lock(run, host=socket.gethostname(), job_id="4242", pid=holder.pid, since="earlier")
        with pytest.raises(RunDirectoryLocked, match=r"in use by job 4242, host .*pid %d.*--train.break_lock true"
                           % holder.pid):
            RunLock(run).acquire()
        lock = RunLock(run).acquire(break_lock=True)          # the user says that job is gone
        assert json.load(open(os.path.join(run, LOCK_NAME)))["pid"] == os.getpid()
        lock.release()
        assert not os.path.exists(os.path.join(run, LOCK_NAME))
    finally:
        holder.kill()
        holder.wait()
    # stale: same host and the pid is gone -> taken over without a flag
    _write_lock(run, host=socket.gethostname(), job_id=None, pid=holder.pid, since="earlier")
    RunLock(run).acquire().release()
    # stale: our own job id (the run before a requeue), whatever the host
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    _write_lock(run, host="another-node", job_id="777", pid=1, since="earlier")
    RunLock(run).acquire().release()
    # another node, another job: cannot be told from a live writer
    _write_lock(run, host="another-node", job_id="778", pid=1, since="earlier")
    with pytest.raises(RunDirectoryLocked, match="job 778, host another-node"):
        RunLock(run).acquire()


def _setup_only(rank, world, cfg, init_from):
    from megatron_qvgen.training.loop import Trainer

    Trainer(cfg, init_from=init_from).setup()
    return {}



def test_a_second_trainer_on_a_locked_run_directory_is_refused_on_every_rank(teacher_ckpt):
    root, init = teacher_ckpt
    save = str(root / "locked" / "ckpt")
    _write_lock(save, host="another-node", job_id="99", pid=1, since="earlier")
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_setup_only, 2, tiny_cfg(str(root / "locked"), tp=2, save_dir=save), init)
    assert str(err.value).count("RunDirectoryLocked") >= 2   # both ranks stop with the same error
    assert os.listdir(save) == [LOCK_NAME]


# ---------------------------------------------------------------------------------------- files
def test_retention_keeps_latest_and_the_newest(tmp_path):
    save = str(tmp_path)
    for step in (2, 4, 6, 8, 10):
        _fake_checkpoint(save, step)
    _fake_checkpoint(save, 12, complete=False)    # being written: not a checkpoint yet
    removed = prune(save, keep_last=2, latest_name="iter_0000004", newest_step=10)
    assert removed == ["iter_0000002", "iter_0000006"]
    assert complete_checkpoints(save) == ["iter_0000004", "iter_0000008", "iter_0000010"]
    assert os.path.isdir(os.path.join(save, "iter_0000012"))
    assert prune(save, keep_last=0, latest_name=None, newest_step=10) == []


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_complete(tmp_path, caplog):
    save = str(tmp_path)
    _fake_checkpoint(save, 3)
    _fake_checkpoint(save, 6)
    _fake_checkpoint(save, 9, complete=False)
    open(os.path.join(save, "latest"), "w").write("iter_0000012\n")
    assert latest_checkpoint(save) == os.path.join(save, "iter_0000006")
    assert "names iter_0000012, which is missing; using the newest complete checkpoint, iter_0000006" in caplog.text
    open(os.path.join(save, "latest"), "w").write("iter_0000009\n")
    assert latest_checkpoint(save) == os.path.join(save, "iter_0000006")
    assert "iter_0000009, which is not a complete checkpoint" in caplog.text
    for name in ("iter_0000009.incomplete", "iter_0000003.replaced", "iter_0000001.deleting", "notes"):
        os.makedirs(os.path.join(save, name))
    assert remove_stale_saves(save) == ["iter_0000001.deleting", "iter_0000003.replaced", "iter_0000009.incomplete"]
    assert sorted(os.listdir(save)) == ["iter_0000003", "iter_0000006", "iter_0000009", "latest", "notes"]


# ---------------------------------------------------------------------------------------- in a run
def _train(rank, world, cfg, init_from, stop_at=None):
    import signal

    from megatron_qvgen.training.loop import Trainer

    class Stopped(Trainer):
        def _one_step(self, num_micro):
            if stop_at is not None and self.state.step == stop_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            super()._one_step(num_micro)

    trainer = Stopped(cfg, init_from=init_from).setup()
    resumed_from = trainer.resumed_from
    state = trainer.train()
    return {"resumed_from": resumed_from or "", "step": torch.tensor(state.step),
            "exit": torch.tensor(state.outcome.exit_code), "line": state.outcome.line()}


def test_requeued_run_continues_its_own_checkpoints_not_load_dir(teacher_ckpt):
    root, init = teacher_ckpt
    base = str(root / "base")
    base_save = os.path.join(base, "ckpt")
    run_distributed(_train, 1, tiny_cfg(base, steps=4, save_dir=base_save), init)
    run = str(root / "finetune")
    save = os.path.join(run, "ckpt")
    cfg = tiny_cfg(run, steps=10, save_dir=save, load_dir=base_save, save_interval=2, keep_last=2)
    first = run_distributed(_train, 1, cfg, init, stop_at=6)[0]       # SIGUSR1 during step 7
    assert first["resumed_from"].endswith("base/ckpt/iter_0000004")
    assert int(first["exit"]) == 75 and int(first["step"]) == 7 and "stopped to be requeued (SIGUSR1)" in first["line"]
    # a killed save of the requeued job's predecessor leaves a temporary folder; the requeue cleans it
    os.makedirs(os.path.join(save, "iter_0000009.incomplete"))
    second = run_distributed(_train, 1, cfg, init)[0]
    assert second["resumed_from"].endswith("finetune/ckpt/iter_0000007")
    assert int(second["exit"]) == 0 and int(second["step"]) == 10
    # retention: keep_last=2 newest complete ones (10 is latest); the lock is gone
    assert sorted(os.listdir(save)) == ["iter_0000008", "iter_0000010", "latest"]
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000010"


# ---------------------------------------------------------------------------------------- start-up rules
def test_start_point_warnings_and_bad_values(tmp_path, caplog):
    from megatron_qvgen.config import ConfigError, TrainConfig
    from megatron_qvgen.training.run_directory import _open_on_rank0

    cfg = tiny_cfg(str(tmp_path / "nosave"))
    start = _open_on_rank0(cfg)
    assert start.resume is None and caplog.text.count("train.save_dir is not set: nothing of this run will be saved") == 1
    missing = tiny_cfg(str(tmp_path / "r"), save_dir=str(tmp_path / "r" / "ckpt"), load_dir=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"train.load_dir .*empty holds no complete checkpoint"):
        _open_on_rank0(missing)
    assert not os.path.exists(tmp_path / "r" / "ckpt")     # refused: the run directory it made is gone again
    for field, value, message in (("keep_last", -1, "train.keep_last must be an integer >= 0"),
                                  ("exit_after_minutes", -5, "train.exit_after_minutes must be a number >= 0"),
                                  ("save_interval_minutes", "x", "train.save_interval_minutes must be a number"),
                                  ("async_save", True, "train.async_save needs train.save_dir")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**{field: value})
