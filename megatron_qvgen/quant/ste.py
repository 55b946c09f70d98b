"""Straight-through rounding: round in the forward, identity in the backward (QVGEN.md)."""
import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def scale_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value, gradient multiplied by ``factor`` (LSQ's gradient scaling of step size and zero point)."""
    if factor == 1.0:
        return t
    scaled = t * factor
    return (t - scaled).detach() + scaled
