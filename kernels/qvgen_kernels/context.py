"""The timestep groups of the current forward, set once by the runtime model, read by every quantized linear.

The runtime twin of ``megatron_qvgen.quant.context`` (which this package must not import): each sample's
group picks its activation clip factors, and the model maps its sampler timesteps to groups with
``codes.timestep_group`` exactly as training did.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

_GROUPS: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("qvgen_kernels_timestep_groups",
                                                                                 default=None)


def current_timestep_groups() -> Optional[torch.Tensor]:
    return _GROUPS.get()


@contextlib.contextmanager
def timestep_groups(groups) -> Iterator[torch.Tensor]:
    """Groups (long [batch], or one int for the whole batch) for the duration of a forward."""
    g = torch.as_tensor(groups).long().reshape(-1)
    if g.device.type == "cpu" and g.numel() and int(g.min()) < 0:     # (no host sync for device groups)
        raise ValueError(f"timestep groups must be >= 0, got {g.tolist()}")
    token = _GROUPS.set(g)
    try:
        yield g
    finally:
        _GROUPS.reset(token)
