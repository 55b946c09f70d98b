"""Saves spread over the data-parallel ranks (megatron's fully parallel strategy) and written in the
background (megatron's async save, here on CPU through a forked writer) give checkpoints a run continues
from exactly."""
import os
import signal

import torch

from multiproc import run_distributed
from test_trainer import teacher_ckpt, tiny_cfg  # noqa: F401 - teacher_ckpt: the fixture



def _train(rank, world, cfg, init_from, signal_at=None):
    from megatron_qvgen.training.loop import Trainer

    class Signalled(Trainer):
        def _one_step(self, num_micro):
            if signal_at is not None and self.state.step == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            super()._one_step(num_micro)

    trainer = Signalled(cfg, init_from=init_from).setup()
    state = trainer.train()
    raw = trainer.opt.chunks[0].module
    return {"step": torch.tensor(state.step), "exit": torch.tensor(state.outcome.exit_code),
            "resumed_from": trainer.resumed_from or "",
            "weights": {n: p.detach().clone() for n, p in raw.named_parameters()}}


def _bytes_by_rank(checkpoint):
    sizes = {}
    for name in os.listdir(checkpoint):
        if name.endswith(".distcp"):   # torch_dist: __<rank>_<n>.distcp
            rank = int(name.split("_")[2])
            sizes[rank] = sizes.get(rank, 0) + os.path.getsize(os.path.join(checkpoint, name))
    return sizes


def test_fully_parallel_and_async_saves(teacher_ckpt):
    root, init = teacher_ckpt
    runs = {}
    for name, fields in (("plain", dict(fully_parallel_save=False)), ("parallel", {}),
                         ("async", dict(async_save=True))):
        run = str(root / name)
        cfg = tiny_cfg(run, steps=6, save_dir=os.path.join(run, "ckpt"), save_interval=3, keep_last=0, **fields)
        runs[name] = (cfg, os.path.join(run, "ckpt"))
    plain = run_distributed(_train, 2, runs["plain"][0], init)                # DP = 2: everything replicated
    parallel = run_distributed(_train, 2, runs["parallel"][0], init)
    plain_sizes = _bytes_by_rank(os.path.join(runs["plain"][1], "iter_0000003"))
    parallel_sizes = _bytes_by_rank(os.path.join(runs["parallel"][1], "iter_0000003"))
    # data-parallel rank 0 writes (almost) everything alone; spread, each rank writes a share
    assert plain_sizes.get(1, 0) < 0.1 * plain_sizes[0], plain_sizes
    assert min(parallel_sizes.values()) > 0.3 * max(parallel_sizes.values()), parallel_sizes
    assert abs(sum(parallel_sizes.values()) - sum(plain_sizes.values())) < 0.05 * sum(plain_sizes.values())
    # async: a stop during step 5 saves step 5 in the background, waits for it, exits; the rerun continues
    cfg, save = runs["async"]
    first = run_distributed(_train, 2, cfg, init, signal_at=4)
    assert [int(o["exit"]) for o in first] == [75, 75] and int(first[0]["step"]) == 5
    assert sorted(os.listdir(save)) == ["iter_0000003", "iter_0000005", "latest"]
    second = run_distributed(_train, 2, cfg, init)
    assert second[0]["resumed_from"].endswith("iter_0000005") and int(second[0]["step"]) == 6
    for rank in range(2):
        for n, w in plain[rank]["weights"].items():
            assert torch.equal(parallel[rank]["weights"][n], w) and torch.equal(second[rank]["weights"][n], w), n
