"""Rank decay of the auxiliary module (QVGEN.md): r0 -> r0(1-lambda) -> ... -> 0 over phases of T steps.

Within a phase the last ``r - keep(r)`` columns of gamma follow u(tau) from 1 to 0 (cosine or linear);
at a boundary those columns are dropped and the kept ones re-factored (distributed, exact: the product
is unchanged) so that the next phase decays the weakest singular directions. At r = 0 L and R are
deleted and the layer costs one quantised matmul.

The optimizer owns the master copies of L and R, so every boundary goes through an
:class:`OptimizerAdapter`: the new factors are computed from the optimizer's (fp32) main parameters,
written back to both main and model parameters, and the moments of L and R are reset (Adam moments
of the old factors do not transform into moments of the new ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from megatron_qvgen.config import QuantConfig
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
    """How rank decay reaches the optimizer's copy of a parameter. Subclass per optimizer family."""

    def main_param(self, param: nn.Parameter) -> torch.Tensor:
        raise NotImplementedError

    def replace(self, old: nn.Parameter, new: nn.Parameter, new_main: torch.Tensor) -> None:
        """``new`` takes ``old``'s place; its master copy becomes ``new_main``; its moments start at zero."""
        raise NotImplementedError

    def remove(self, param: nn.Parameter) -> None:
        raise NotImplementedError


class NoOptimizer(OptimizerAdapter):
    """For inference/eval models and tests without an optimizer: the parameter is its own master."""

    def main_param(self, param):
        return param.detach()

    def replace(self, old, new, new_main):
        pass

    def remove(self, param):
        pass


class TorchOptimizerAdapter(OptimizerAdapter):
    """A ``torch.optim`` optimizer whose parameters are the model's (fp32 training: they are the masters)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def _locate(self, param):
        for group in self.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is param:
                    return group, i
        raise KeyError("parameter is not in the optimizer")

    def main_param(self, param):
        return param.detach()

    def replace(self, old, new, new_main):
        group, i = self._locate(old)
        group["params"][i] = new
        self.optimizer.state.pop(old, None)
        with torch.no_grad():
            new.copy_(new_main)

    def remove(self, param):
        group, i = self._locate(param)
        del group["params"][i]
        self.optimizer.state.pop(param, None)


def _layers_with_aux(models) -> List[nn.Module]:
    from megatron_qvgen.quant import quant_linears

    return [layer for layer in quant_linears(models) if layer.has_aux]


@torch.no_grad()
def decay_layer(layer: nn.Module, new_rank: int, adapter: OptimizerAdapter) -> None:
    """Drop the decayed columns of one layer's L, R and re-factor the kept ones (or delete them at 0)."""
    old_l, old_r = layer.aux_L, layer.aux_R
    if new_rank >= layer.aux_rank:
        raise ValueError(f"rank decay of '{layer.quant_name}' must lower the rank: {layer.aux_rank} -> {new_rank}")
    if new_rank == 0:
        adapter.remove(old_l)
        adapter.remove(old_r)
        layer.set_aux_factors(None, None)
        return
    main_l = adapter.main_param(old_l)[:, :new_rank]
    main_r = adapter.main_param(old_r)[:new_rank]
    group = layer._tp_group_if_split
    t_l, t_r = refactor_transforms(main_l, main_r, l_sharded=layer._rows_split, group=group)
    new_main_l = (main_l.double() @ t_l).to(main_l.dtype)
    new_main_r = (t_r @ main_r.double()).to(main_r.dtype)
    layer.set_aux_factors(new_main_l, new_main_r)
    adapter.replace(old_l, layer.aux_L, new_main_l)
    adapter.replace(old_r, layer.aux_R, new_main_r)


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
            decay_layer(layer, new_rank, self.adapter)
        return len(layers)

    def current_rank(self) -> int:
        ranks = {layer.aux_rank for layer in _layers_with_aux(self.models)}
        if len(ranks) > 1:
            raise RuntimeError(f"auxiliary factors have mixed ranks {sorted(ranks)}")
        return ranks.pop() if ranks else 0

    def restore(self, step: int) -> None:
        """Shape the factors of a freshly built model for ``step`` before loading its checkpoint."""
        rank = self.schedule.rank_at(step)
        for layer in _layers_with_aux(self.models):
            layer.resize_aux(rank)
