"""Replay a whole forward as one CUDA graph: no host work and no kernel launch gaps per step.

:class:`GraphedCall` wraps a function of tensors. The first call with a new signature (shapes, dtypes, devices and
every non-tensor argument) runs it twice on a side stream (Triton compiles, workspaces and caches fill), then
captures it into a CUDA graph with static copies of the tensor inputs; every call copies its inputs into those
buffers and replays the graph. Outputs are cloned: a pipeline that calls twice a step (conditional and
unconditional) keeps both. The function must not synchronize with the host (the runtime transformers compute
their timestep groups on the device for this) nor branch on tensor values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch
from torch.utils import _pytree as pytree


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: List[Any]            # static leaves (tensors: the buffers the graph reads)
    output: Any


def _signature(leaf):
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)     # any strides: copied into the buffer
    return ("value", leaf)


class GraphedCall:
    """``fn(*args, **kwargs)`` captured once per signature and replayed (CUDA tensors only)."""

    def __init__(self, fn: Callable, warmup: int = 2):
        self.fn = fn
        self.warmup = warmup
        self.graphs: Dict[Any, _Captured] = {}
        self.active = False          # True while fn runs inside warm-up or capture (nested calls run it directly)

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (spec, tuple(_signature(leaf) for leaf in leaves))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(leaves, spec)
        else:
            for buf, leaf in zip(entry.inputs, leaves):
                if isinstance(leaf, torch.Tensor):
                    buf.copy_(leaf)
        entry.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.output)

    def _run(self, leaves, spec):
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        with torch.no_grad():
            return self.fn(*args, **kwargs)

    def _capture(self, leaves, spec) -> _Captured:
        if not all(leaf.is_cuda for leaf in leaves if isinstance(leaf, torch.Tensor)):
            raise ValueError("GraphedCall replays CUDA graphs: every tensor argument must be on a CUDA device")
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.active = True
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._run(static, spec)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self._run(static, spec)
        finally:
            self.active = False
        return _Captured(graph, static, output)

    def clear(self) -> None:
        self.graphs.clear()
