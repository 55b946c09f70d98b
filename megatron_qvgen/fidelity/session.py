"""One process, TP = PP = 1: how the evaluation runs megatron models whatever layout they were saved at.

megatron's dist checkpoints reshard on load, so a model saved at any TP/PP loads into a TP = 1 model. The
process group is a private in-memory store (no port to collide with a training job next to it); under a
launcher with more than one process the tool refuses, since it would evaluate the same thing N times.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_qvgen.config import ParallelConfig
from megatron_qvgen.fidelity.errors import EvaluationError

SINGLE = ParallelConfig(tensor_parallel=1, pipeline_parallel=1)


_OWN_GROUP = False


def open_single_process(seed: int = 0):
    """Join (or check) a one-process group and build megatron's TP = PP = 1 state; returns ParallelInfo."""
    global _OWN_GROUP
    from megatron_qvgen.parallel import initialize_parallel

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise EvaluationError(f"evaluation runs in one process at TP = 1; this job has {dist.get_world_size()} "
                                  "processes (start it with python, not torchrun)")
    elif int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise EvaluationError(f"evaluation runs in one process at TP = 1; WORLD_SIZE={os.environ['WORLD_SIZE']} "
                              "(start it with python, not torchrun)")
    else:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP = True
    return initialize_parallel(SINGLE, seed=seed)


def close_single_process() -> None:
    """Undo what open_single_process set up (a group the caller had joined before stays)."""
    global _OWN_GROUP
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


