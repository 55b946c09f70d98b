"""Whether the Triton kernels can run here: on a CUDA device, or on CPU through Triton's interpreter.

The interpreter is chosen when a function is decorated, so ``TRITON_INTERPRET=1`` must be set before
``triton`` is first imported (megatron-core imports it): set afterwards, triton's own library functions
(``tl.min``, ``tl.sum``) stay compiled-only and an interpreted kernel fails when it calls them.
"""
from __future__ import annotations

import functools
import os


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_active() -> bool:
    """True when triton's library functions were decorated for the interpreter (they run on CPU tensors)."""
    if not interpreter_requested():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.standard.max, InterpretedFunction)


def on_hopper(where) -> bool:
    """Whether ``where`` (a tensor or a device) is a Hopper GPU (sm_90), compiled (not the interpreter): the one GPU
    kind the int8 attention and the fused element-wise kernels have been validated on, so the kind they are the
    default on."""
    import torch
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if interpreter_requested() or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _is_sm90(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    """Asked by every Wan block at every forward (``fusable``): the capability is read once a device."""
    import torch
    return torch.cuda.get_device_capability(index) == (9, 0)


def gluon_runs_on(t) -> bool:
    """Whether the Gluon kernels (written for Hopper's wgmma; Gluon has no interpreter) can run on ``t``'s device."""
    return on_hopper(t)


INTERPRETER_HINT = ("set TRITON_INTERPRET=1 before triton is first imported (tests/conftest.py imports "
                    "megatron.core, which imports triton)")
