"""Rank decay of the auxiliary module (QVGEN.md): r0 -> r0(1-lambda) -> ... -> 0 over phases of T steps.

Within a phase the last ``r - keep(r)`` columns of gamma follow u(tau) from 1 to 0 (cosine or linear);
at a boundary those columns are dropped and the kept ones re-factored (distributed, exact: the product
is unchanged) so that the next phase decays the weakest singular directions. At r = 0 L and R are
deleted and the layer costs one quantised matmul.

The optimizer owns the master copies of L and R, so every boundary goes through an
:class:`OptimizerAdapter`: the re-factorisation is computed from the optimizer's whole (fp32) main
parameters (gathered where a distributed optimizer shards them), written in place to both main and model
parameters, and the moments of L and R are reset, realigned or kept (``quant.decay_moments``, see
``decay_moments.py``: Adam's moments of the old factors describe a basis that is gone). L and R keep
their r0-wide storage until rank 0 (the layer's ``aux_active_rank`` buffer says how much is live), so
megatron's DDP buffers and the checkpoint layout never change mid-run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from megatron_qvgen.config import QuantConfig
from megatron_qvgen.quant.decay_moments import MomentRemap, boundary_moment_remap
from megatron_qvgen.quant.distributed_svd import refactor_transforms


@dataclass(frozen=True)
class RankDecaySchedule:
    """Pure function of the step: the rank, the gate u and the boundaries."""

    quant: QuantConfig
    phase_steps: int

    def __post_init__(self):
        if self.phase_steps < 1:
            raise ValueError(f"rank-decay phase length must be >= 1 step, got {self.phase_steps}")

    @property
    def ranks(self) -> Sequence[int]:
        return self.quant.rank_sequence()

    @property
    def active(self) -> bool:
        return self.quant.has_aux and self.quant.rank_decay

    def phase(self, step: int) -> int:
        return min(step // self.phase_steps, len(self.ranks) - 1)

    def rank_at(self, step: int) -> int:
        if not self.quant.has_aux:
            return 0
        return self.ranks[self.phase(step)] if self.active else self.quant.aux_rank

    def gate_at(self, step: int) -> float:
        """u of the decaying columns at ``step`` (1 at the start of each phase)."""
        if not self.active or self.rank_at(step) == 0:
            return 1.0
        frac = (step % self.phase_steps) / self.phase_steps
        if self.quant.decay_anneal == "cosine":
            return (1.0 + math.cos(math.pi * frac)) / 2.0
        return 1.0 - frac

    def boundary_rank(self, step: int) -> Optional[int]:
        """The new rank if ``step`` starts a phase with a smaller rank, else None."""
        if not self.active or step == 0:
            return None
        new, old = self.rank_at(step), self.rank_at(step - 1)
        return new if new != old else None


class OptimizerAdapter:
    """How rank decay reaches the optimizer's copies of L and R. Subclass per optimizer family.

    The factors keep their r0-wide storage while decaying (only rank 0 removes them), so a boundary
    reads the whole master copy, computes the new factors from it and writes them back in place: into
    the master copy and, rounded, into the model parameter. Both methods may be collectives (a sharded
    optimizer gathers the master copy): every rank calls them for the same parameters in the same order."""

    def full_master(self, param: nn.Parameter) -> torch.Tensor:
        """The whole master copy of ``param``: the most precise one the optimizer has (e.g. fp32)."""
        raise NotImplementedError

    def replace(self, param: nn.Parameter, whole: torch.Tensor, remap: Optional[MomentRemap] = None) -> None:
        """Make ``whole`` the master copy of ``param`` and, rounded, ``param`` itself. Its moments: zeroed when
        ``remap`` is None, else ``remap`` of the whole moments (read before the write)."""
        raise NotImplementedError

    def remove(self, params: Sequence[nn.Parameter]) -> None:
        """``params`` leave the model (rank 0): the optimizer must forget them."""
        raise NotImplementedError


class NoOptimizer(OptimizerAdapter):
    """Models without an optimizer (evaluation, conversion, tests)."""

    def full_master(self, param):
        return param.detach()

    def replace(self, param, whole, remap=None):
        with torch.no_grad():
            param.copy_(whole)

    def remove(self, params):
        pass


class TorchOptimizerAdapter(NoOptimizer):
    """A ``torch.optim`` optimizer over the model's own parameters: they are the masters."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def replace(self, param, whole, remap=None):
        super().replace(param, whole)
        state = self.optimizer.state.get(param)
        if remap is None or not state:
            reset_moments(state)
            return
        moments = {k: v for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.shape == param.shape}
        with torch.no_grad():
            for name, new in remap(moments).items():
                state[name].copy_(new)

    def remove(self, params):
        gone = {id(p) for p in params}
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for p in params:
            self.optimizer.state.pop(p, None)


def reset_moments(state: Optional[dict]) -> None:
    """Zero a parameter's optimizer moments, keeping its step count (megatron's optimizers share one step
    across all parameters; with Adam the first update after the reset is a damped sign step)."""
    if not state:
        return
    for key, value in state.items():
        if key != "step" and torch.is_tensor(value):
            value.zero_()


def _layers_with_aux(models) -> List[nn.Module]:
    from megatron_qvgen.quant import quant_linears

    return [layer for layer in quant_linears(models) if layer.has_aux]


def _refactored(full: torch.Tensor, transform: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    """Kept columns (L) / rows (R) times the k x k transform, zeros beyond ``rank``."""
    out = torch.zeros_like(full)
    if left:
        out[:, :rank] = (full[:, :rank].double() @ transform).to(full.dtype)
    else:
        out[:rank] = (transform @ full[:rank].double()).to(full.dtype)
    return out


@torch.no_grad()
def decay_layer(layer: nn.Module, new_rank: int, adapter: OptimizerAdapter, moments: str = "reset") -> None:
    """Drop the decayed columns of one layer's L, R and re-factor the kept ones (or delete them at 0);
    ``moments``: what becomes of their optimizer moments (``decay_moments.DECAY_MOMENTS``)."""
    if new_rank >= layer.aux_rank:
        raise ValueError(f"rank decay of '{layer.quant_name}' must lower the rank: {layer.aux_rank} -> {new_rank}")
    if new_rank == 0:
        adapter.remove([layer.aux_L, layer.aux_R])
        layer.remove_aux()
        return
    # From the master copies (fp32 main params), never from a rounded model copy: L R stays exact.
    src_l = adapter.full_master(layer.aux_L)
    src_r = adapter.full_master(layer.aux_R)
    t_l, t_r = refactor_transforms(src_l[:, :new_rank], src_r[:new_rank], l_sharded=layer._rows_split,
                                   group=layer._tp_group_if_split)
    # grad(L') = grad(L_k) T_R^T and grad(R') = T_L^T grad(R_k)
    adapter.replace(layer.aux_L, _refactored(src_l, t_l, new_rank, left=True),
                    boundary_moment_remap(moments, t_r.T, new_rank, left=True))
    adapter.replace(layer.aux_R, _refactored(src_r, t_r, new_rank, left=False),
                    boundary_moment_remap(moments, t_l.T, new_rank, left=False))
    layer.set_active_rank(new_rank)


class RankDecay:
    """Drives the schedule over a model: call :meth:`on_step` before each training step's forward."""

    def __init__(self, models: Union[nn.Module, Iterable[nn.Module]], schedule: RankDecaySchedule,
                 adapter: Optional[OptimizerAdapter] = None):
        self.models = models
        self.schedule = schedule
        self.adapter = adapter or NoOptimizer()

    def on_step(self, step: int) -> float:
        """Apply a boundary if ``step`` starts one; return the gate u for this step's forward."""
        new_rank = self.schedule.boundary_rank(step)
        if new_rank is not None:
            self.apply_rank(new_rank)
        return self.schedule.gate_at(step)

    def apply_rank(self, new_rank: int) -> int:
        """Bring every auxiliary factor to ``new_rank``; returns the number of layers changed."""
        layers = [layer for layer in _layers_with_aux(self.models) if layer.aux_rank > new_rank]
        for layer in layers:
            decay_layer(layer, new_rank, self.adapter, self.schedule.quant.decay_moments)
        return len(layers)

    def current_rank(self) -> int:
        ranks = {layer.aux_rank for layer in _layers_with_aux(self.models)}
        if len(ranks) > 1:
            raise RuntimeError(f"auxiliary factors have mixed ranks {sorted(ranks)}")
        return ranks.pop() if ranks else 0

    def restore(self, aux_in_checkpoint: bool) -> None:
        """Prepare a freshly built model for a checkpoint: once its last boundary had run the factors no
        longer exist (earlier ranks live in the checkpoint's ``aux_active_rank`` buffers). Decided by what
        the checkpoint holds, not by the schedule, so a changed ``train.steps`` still resumes."""
        if not aux_in_checkpoint:
            for layer in _layers_with_aux(self.models):
                layer.remove_aux()
