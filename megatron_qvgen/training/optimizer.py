"""megatron's DDP, optimizer and LR schedule for the QAT student, with QVGEN.md's parameter groups.

AdamW (0.9, 0.95), eps 1e-8, weight decay 1e-4 on EVERY parameter (QVGEN.md; megatron's default would
skip biases and norms), lr for weights / biases / norms / s / z, ``aux_lr`` for L and R, ``act_clip_lr``
for the activation clip logits; linear warm-up then cosine; grad-norm clipping; bf16 params with fp32
main params. Rank decay reaches the optimizer's main copies through :class:`MegatronOptimizerAdapter`;
when the auxiliary parameters leave the model (rank 0) the DDP wrappers and the optimizer are rebuilt
over the remaining parameters, carrying every surviving parameter's main copy and moments over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn

from megatron_qvgen.config import ExperimentConfig
from megatron_qvgen.quant.rank_decay import OptimizerAdapter
from megatron_qvgen.training.main_params import (MOMENTS, MainCopy, agreed_adam_step, continue_group_steps, locate,
                                                 sub_optimizers)

CLIP_LOGIT_PATTERN = "*act_quantizer.clip_*"
AUX_PATTERNS = ("*aux_L", "*aux_R")


@dataclass
class Optimization:
    """What a training step needs: DDP-wrapped chunks, the optimizer and its schedule."""

    chunks: List[nn.Module]
    optimizer: object
    scheduler: object


def _optimizer_config(cfg: ExperimentConfig):
    from megatron.core.optimizer import OptimizerConfig

    t = cfg.train
    bf16 = t.precision == "bf16"
    return OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.lr * t.min_lr_ratio, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def _param_group_overrides(cfg: ExperimentConfig) -> Dict:
    """lr per group; an explicit (non-None) dict also turns off megatron's bias/norm weight-decay skip.

    megatron's scheduler takes a group's lr from its ``max_lr``/``min_lr``; its checkpoint loader matches
    groups by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) only, so each extra group also
    carries ``lr_mult`` = its lr / the base lr (read by nothing else in megatron-core 0.16) to stay
    distinguishable. A group whose lr equals the base lr is not split off at all.
    """
    from megatron.core.optimizer import ParamKey

    t = cfg.train
    overrides = {}
    for names, lr in ((CLIP_LOGIT_PATTERN, t.act_clip_lr), (AUX_PATTERNS, t.aux_lr)):
        if lr != t.lr:
            overrides[ParamKey(name=names)] = {"max_lr": lr, "min_lr": lr * t.min_lr_ratio,
                                               "lr_mult": lr / t.lr if t.lr > 0 else float(lr)}
    return overrides


def wrap_ddp(raw_chunks: Sequence[nn.Module], cfg: ExperimentConfig) -> List[nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer, check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(raw_chunks):
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                               disable_bucketing=i > 0))
    return wrapped


def build_optimization(raw_chunks: Sequence[nn.Module], cfg: ExperimentConfig) -> Optimization:
    """DDP-wrap the student's chunks and build megatron's optimizer and schedule over them."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    chunks = wrap_ddp(raw_chunks, cfg)
    optimizer = get_megatron_optimizer(_optimizer_config(cfg), chunks, config_overrides=_param_group_overrides(cfg))
    t = cfg.train
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.lr * t.min_lr_ratio,
        lr_warmup_steps=int(t.warmup_fraction * t.steps), lr_decay_steps=t.steps, lr_decay_style="cosine",
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
    )
    return Optimization(chunks=chunks, optimizer=optimizer, scheduler=scheduler)


def lrs_by_group(optimizer, cfg: ExperimentConfig) -> Dict[str, float]:
    """Current learning rate of the weights, the auxiliary factors and the activation clip logits."""
    t = cfg.train
    out = {}
    for sub in sub_optimizers(optimizer):
        for group in sub.param_groups:
            max_lr = group.get("max_lr", t.lr)
            if group.get("default_config", True):
                out.setdefault("weights", group["lr"])
                continue
            if max_lr == t.act_clip_lr:
                out.setdefault("clip_logits", group["lr"])
            if max_lr == t.aux_lr:
                out.setdefault("aux", group["lr"])
    out.setdefault("aux", out.get("weights"))
    out.setdefault("clip_logits", out.get("weights"))
    return out


# ---------------------------------------------------------------------------------------------- rank decay
class MegatronOptimizerAdapter(OptimizerAdapter):
    """Rank decay's access to megatron's main (fp32) copies and Adam moments, on every optimizer kind.

    The re-factorisation is computed from the whole main copy: held whole by the Float16 / FP32
    optimizers, gathered from its DP pieces (a collective; L and R are small) with the distributed
    optimizer. The result is written to every rank's main piece and, rounded, to the model copy; each
    rank zeroes (or re-maps, ``quant.decay_moments``) its piece of the moments. Removal (rank 0) is recorded and carried out by
    :func:`rebuild_without` once the schedule step is done.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.removed: List[nn.Parameter] = []

    def _main_copy(self, param) -> MainCopy:
        found = locate(self.optimizer, param)
        if found is None:
            raise KeyError(f"rank decay: a parameter of shape {tuple(param.shape)} is not managed by the optimizer")
        return found

    def full_master(self, param):
        """Collective over the data-parallel group with the distributed optimizer."""
        return self._main_copy(param).gather()["param"]

    def replace(self, param, whole, remap=None):
        """Collective over the data-parallel group with the distributed optimizer when ``remap`` is given."""
        copy = self._main_copy(param)
        if remap is None:
            copy.write_param(whole)
            copy.reset_moments()
            return
        moments = copy.gather(MOMENTS)
        del moments["param"]
        copy.write_param(whole)
        copy.write_moments(remap(moments))

    def remove(self, params):
        self.removed.extend(params)


def carry_state(old_chunks, old_optimizer, new_chunks, new_optimizer) -> int:
    """Copy every surviving parameter's main copy and Adam moments (and step count) from the old optimizer
    into the new one. With the distributed optimizer the DP pieces change when parameters leave the
    buckets, so each tensor is gathered whole from the old pieces and re-sliced into the new ones.

    Collective; parameters are matched by name (the raw modules are the same objects); returns how many
    moved."""
    old_named = dict(_named_raw(old_chunks))
    step = agreed_adam_step(old_optimizer)
    moments = MOMENTS if step is not None else ()
    moved = 0
    for name, param in _named_raw(new_chunks):
        if old_named.get(name) is not param:
            continue
        old, new = locate(old_optimizer, param), locate(new_optimizer, param)
        if old is None or new is None:
            continue
        whole = old.gather(moments)
        new.write_param(whole["param"])
        if step is not None:
            new.write_state(whole, step)
        moved += 1
    continue_group_steps(new_optimizer, step)
    return moved


def _named_raw(chunks):
    for i, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        for name, p in module.named_parameters():
            yield f"{i}.{name}", p


def retire_ddp(chunks: Sequence[nn.Module]) -> None:
    """megatron DDP keeps its grad hooks on the parameters for their lifetime: make the old wrappers'
    hooks no-ops and drop their buffers so that the new wrappers alone own the gradients."""
    for chunk in chunks:
        for attr in ("param_to_bucket_group",):
            if hasattr(chunk, attr):
                getattr(chunk, attr).clear()
        for attr in ("buffers", "expert_parallel_buffers", "bucket_groups", "expert_parallel_bucket_groups"):
            if hasattr(chunk, attr):
                setattr(chunk, attr, [])


def rebuild_without(opt: Optimization, cfg: ExperimentConfig) -> Optimization:
    """New DDP wrappers, optimizer and schedule over the raw chunks' current parameters (after the
    auxiliary factors were deleted), with state, lr position and main copies carried over."""
    raw = [getattr(c, "module", c) for c in opt.chunks]
    new = build_optimization(raw, cfg)
    carry_state(opt.chunks, opt.optimizer, new.chunks, new.optimizer)
    new.scheduler.load_state_dict(opt.scheduler.state_dict())
    retire_ddp(opt.chunks)
    return new
