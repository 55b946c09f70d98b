"""torch.distributed + megatron-core parallel_state start-up, for torchrun, SLURM and in-process tests.

gloo on CPU (with the CPU shim), nccl on GPU. The data-parallel rank (not the global rank) decides which
samples a rank reads; helpers here expose it so the data and training layers never guess.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_qvgen import cpu_shim
from megatron_qvgen.config import ParallelConfig


@dataclass(frozen=True)
class ParallelInfo:
    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Join the process group described by the torchrun/SLURM environment (no-op if already joined)."""
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        # srun without torchrun: derive torchrun's variables from SLURM's.
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        if key not in os.environ:
            if key == "MASTER_ADDR":
                os.environ[key] = "127.0.0.1"
            elif key == "MASTER_PORT":
                os.environ[key] = "29500"
            else:
                os.environ[key] = "0" if key == "RANK" else "1"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize_parallel(cfg: ParallelConfig, seed: int | None = None) -> ParallelInfo:
    """Build megatron's TP/PP/DP groups on an initialised process group and seed every RNG.

    Call after :func:`init_distributed` (or after a test harness joined its own group).
    """
    from megatron.core import parallel_state as ps

    cpu_shim.apply()
    if not dist.is_initialized():
        init_distributed(cfg.backend if cfg.backend != "auto" else None)
    world = dist.get_world_size()
    cfg.check_world_size(world)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline,
        # megatron's optimizer uses gloo groups for its (CPU-side) state exchange by default
        create_gloo_process_groups=True,
    )
    if seed is not None:
        set_seed(seed)
    return parallel_info()


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch identically on every rank and megatron's TP-aware device RNG tracker.

    The tracker gives each TP rank its own stream inside ``get_cuda_rng_tracker().fork()`` (dropout in
    TP regions) while the default stream is shared by all ranks of a model-parallel group.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def parallel_info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelInfo(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
