"""Where megatron's optimizers keep a parameter's main (fp32) copy and Adam moments, read and written whole.

The Float16 (bf16 params) and FP32 optimizers hold each main tensor whole on every rank. The distributed
optimizer (ZeRO-1) holds, on each data-parallel rank, the slice of every DDP bucket that this rank owns: a
parameter's main copy and moments are spread over the DP group in flat pieces, and a rank may own none of
it. Rank decay and the rebuild at rank 0 need whole tensors, so reading is a collective over that group
(each rank contributes its piece, zeros elsewhere; the sum is exact since exactly one rank owns each
element) and writing is local (each rank keeps its piece of the whole result). Every rank of a DP group
must therefore read the same parameters in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_qvgen.quant.rank_decay import reset_moments

# The moments of megatron's Adam/AdamW (torch, TE and apex alike); megatron's own checkpoint code names them.
MOMENTS = ("exp_avg", "exp_avg_sq")


def sub_optimizers(optimizer) -> List:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


@dataclass
class MainCopy:
    """One parameter's main copy as one optimizer holds it on this rank."""

    param: torch.nn.Parameter
    inner: torch.optim.Optimizer              # the torch optimizer whose state holds the moments
    main: Optional[torch.Tensor]              # whole, or the flat piece this rank owns; None: owns none
    piece: Optional[slice] = None             # which part of param.view(-1) ``main`` covers (sharded only)
    group: Optional[dist.ProcessGroup] = None  # the DP group the pieces are spread over; None: whole here

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def state(self) -> Optional[dict]:
        return None if self.main is None else self.inner.state.get(self.main)

    def gather(self, moments: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
        """{"param": whole main, each moment: whole moment} in fp32, shaped like the parameter.
        A collective over the DP group when sharded; a moment this rank has no state for reads as 0."""
        state = self.state() or {}
        names = ("param",) + tuple(moments)
        local = {"param": self.main, **{m: state.get(m) for m in moments}}
        if not self.sharded:
            return {n: (local[n].detach().float().reshape(self.param.shape) if local[n] is not None
                        else torch.zeros(self.param.shape, dtype=torch.float32, device=self.param.device))
                    for n in names}
        whole = torch.zeros(len(names), self.param.numel(), dtype=torch.float32, device=self.param.device)
        if self.main is not None:
            for row, n in enumerate(names):
                if local[n] is not None:
                    whole[row, self.piece] = local[n].detach().reshape(-1).float()
        dist.all_reduce(whole, group=self.group)
        return {n: whole[row].reshape(self.param.shape) for row, n in enumerate(names)}

    def _mine(self, whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        part = whole.reshape(-1)[self.piece] if self.sharded else whole
        return part.reshape(like.shape).to(like.dtype)

    @torch.no_grad()
    def write_param(self, whole: torch.Tensor) -> None:
        """This rank's part of ``whole`` into the main copy, and ``whole`` (rounded) into the model param,
        so that the model copy equals the rounded main copy on every rank."""
        if self.main is not None:
            self.main.copy_(self._mine(whole, self.main))
        if self.main is not self.param:
            self.param.copy_(whole.to(self.param.dtype))

    @torch.no_grad()
    def write_state(self, whole: Dict[str, torch.Tensor], step: "AdamStep") -> None:
        """This rank's part of each whole moment (and Adam's step count where the optimizer keeps it per
        parameter) as the main copy's state."""
        if self.main is None:
            return
        state = {m: self._mine(whole[m], self.main).clone() for m in MOMENTS if m in whole}
        if step.in_state:
            state["step"] = step.value.clone()
        self.inner.state[self.main] = state

    @torch.no_grad()
    def write_moments(self, whole: Dict[str, torch.Tensor]) -> None:
        """This rank's part of each whole moment into the existing state (none before the first step: nothing
        to write); the step count stays."""
        state = self.state()
        for name, tensor in whole.items():
            if state and name in state:
                state[name].copy_(self._mine(tensor, state[name]))

    def reset_moments(self) -> None:
        """Zero this rank's part of the moments (every rank zeroes its own part: all of them agree)."""
        reset_moments(self.state())


def locate(optimizer, param: torch.nn.Parameter) -> Optional[MainCopy]:
    """``param``'s main copy in ``optimizer`` (megatron's, possibly chained), or None if not managed."""
    for sub in sub_optimizers(optimizer):
        if hasattr(sub, "model_param_gbuf_map"):          # distributed optimizer
            found = _locate_sharded(sub, param)
        elif hasattr(sub, "float16_groups"):              # bf16 params with fp32 main params
            found = _locate_float16(sub, param)
        else:                                             # fp32 params are their own main copy
            found = _locate_plain(sub, param)
        if found is not None:
            return found
    return None


def _locate_sharded(sub, param) -> Optional[MainCopy]:
    buffer = next((b for b in getattr(sub, "buffers", ()) if param in b.param_index_map), None)
    if buffer is None:
        return None
    group = buffer.data_parallel_group
    if param not in sub.model_param_gbuf_map:             # another DP rank owns all of it
        return MainCopy(param, sub.optimizer, None, None, group)
    piece = sub._get_model_param_range_map(param)["param"]
    group_index, order = sub.model_param_group_index_map[param]
    main = sub.optimizer.param_groups[group_index]["params"][order]
    return MainCopy(param, sub.optimizer, main, slice(piece.start, piece.end), group)


def _locate_float16(sub, param) -> Optional[MainCopy]:
    for model_group, main_group in zip(sub.float16_groups, sub.fp32_from_float16_groups):
        for p, main in zip(model_group, main_group):
            if p is param:
                return MainCopy(param, sub.optimizer, main)
    for group in sub.fp32_from_fp32_groups:
        if any(p is param for p in group):
            return MainCopy(param, sub.optimizer, param)
    return None


def _locate_plain(sub, param) -> Optional[MainCopy]:
    for group in sub.param_groups:
        if any(p is param for p in group["params"]):
            return MainCopy(param, sub.optimizer, param)
    return None


@dataclass
class AdamStep:
    """Adam's step count (one for all parameters) and where the optimizer keeps it: torch's Adam in every
    parameter's state, TE / apex FusedAdam in each param group."""

    value: torch.Tensor
    in_state: bool
    in_groups: bool


def agreed_adam_step(optimizer) -> Optional[AdamStep]:
    """The optimizer's step count, agreed over all ranks (a rank of the distributed optimizer may own
    no state at all); None before the first step. Collective over the world group."""
    step, in_state, in_groups = -1.0, 0.0, 0.0
    for sub in sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if "step" in state:
                step, in_state = max(step, float(state["step"])), 1.0
        for group in (inner.param_groups if inner is not None else ()):
            if "step" in group and group["step"] is not None:
                step, in_groups = max(step, float(group["step"])), 1.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    agreed = torch.tensor([step, in_state, in_groups], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    step, in_state, in_groups = agreed.tolist()
    if step < 0:
        return None
    return AdamStep(torch.tensor(step, dtype=torch.float32), bool(in_state), bool(in_groups))


def continue_group_steps(optimizer, step: Optional[AdamStep]) -> None:
    """Where the old optimizer counted steps per group (TE / apex FusedAdam), the new one continues."""
    if step is None or not step.in_groups:
        return
    for sub in sub_optimizers(optimizer):
        for group in (sub.optimizer.param_groups if getattr(sub, "optimizer", None) is not None else ()):
            group["step"] = int(step.value.item())

