"""Straight-through rounding: round in the forward, identity in the backward (QVGEN.md)."""
import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Exactly the same value, gradient multiplied by ``factor`` (LSQ's gradient scaling of step size and
    zero point). The usual ``(t - t*f).detach() + t*f`` trick can move the value by an ulp, and the codes
    of the export are computed from the stored value: the fake quantizer must use that very value."""
    if factor == 1.0:
        return t
    return _ScaleGrad.apply(t, factor)
