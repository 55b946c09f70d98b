"""QuantContext: what every quantized linear of one forward needs to know, set once per forward.

- ``timestep_groups``: long tensor [batch], the activation-clip group of each sample (QVGEN.md:
  per-sample groups, ``floor(t) mod num_groups``). Quantized linears take inputs shaped
  ``(..., batch, hidden)`` (megatron's [s, b, h], or [b, h]) and pick each sample's clip logits.
- ``aux_gate``: the rank-decay annealing value u in [0, 1] of the current step (gamma of the decaying
  columns); the training loop sets it from its RankDecaySchedule.

Contexts nest: an inner one overrides the fields it sets (the model sets the timestep groups from its
own timestep input, the trainer sets the gate around the whole step).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch


@dataclass(frozen=True)
class QuantContext:
    timestep_groups: Optional[torch.Tensor] = None
    aux_gate: Optional[float] = None


_CURRENT: contextvars.ContextVar[QuantContext] = contextvars.ContextVar("qvgen_quant_context", default=QuantContext())


def current_quant_context() -> QuantContext:
    return _CURRENT.get()


@contextlib.contextmanager
def quant_context(timestep_groups: Optional[torch.Tensor] = None, aux_gate: Optional[float] = None
                  ) -> Iterator[QuantContext]:
    """Set (some of) the context for the duration of a forward (and its recomputation)."""
    ctx = _CURRENT.get()
    if timestep_groups is not None:
        ctx = replace(ctx, timestep_groups=torch.as_tensor(timestep_groups).long().reshape(-1))
    if aux_gate is not None:
        if not 0.0 <= float(aux_gate) <= 1.0:
            raise ValueError(f"aux_gate must be in [0, 1], got {aux_gate}")
        ctx = replace(ctx, aux_gate=float(aux_gate))
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def bind_current_context(fn):
    """Wrap ``fn`` so that it runs under the context active NOW, wherever it is called later.

    Activation recomputation replays a block's forward during backward, after the forward's context
    has exited: checkpoint ``bind_current_context(block.forward)`` instead of ``block.forward``.
    """
    captured = _CURRENT.get()

    def bound(*args, **kwargs):
        token = _CURRENT.set(captured)
        try:
            return fn(*args, **kwargs)
        finally:
            _CURRENT.reset(token)

    return bound
