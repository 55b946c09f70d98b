"""Pipeline-parallel placement and the gradient reductions of parameters replicated across ranks.

- ``stage_layers``: which transformer blocks a (virtual) pipeline stage holds (megatron's interleaved
  assignment: chunk v of stage p holds the (v * P + p)-th run of ``L / (P * V)`` consecutive blocks).
- Conditioning embedders are replicated on every pipeline stage (each stage recomputes the conditioning
  from the raw inputs). Their parameters are tagged ``pipeline_replicated``; after the backward of all
  micro-batches ``reduce_pipeline_replicated_grads`` sums their gradients over the pipeline group (and
  over the virtual chunks of a rank) so all copies take the same optimizer step.
- Parameters applied to token-sharded activations under sequence parallelism (norm affines, row-parallel
  biases) are tagged ``sequence_parallel`` (megatron's tag); ``reduce_sequence_parallel_grads`` sums
  them over TP. megatron's ``finalize_model_grads`` does that one itself for DDP-wrapped models.

Call the reductions on the local (``.grad``) or the DDP (``.main_grad``) gradients, BEFORE the
data-parallel reduction when the distributed optimizer is on: its reduce-scatter leaves only each rank's
shard valid, and stages lay out their gradient buffers differently.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

PIPELINE_REPLICATED = "pipeline_replicated"


def stage_layers(num_layers: int, pp_size: int, pp_rank: int, vp_size: int | None = None,
                 vp_rank: int | None = None) -> Tuple[int, int]:
    """[start, end) of the global block indices held by a (virtual) pipeline stage."""
    chunks = pp_size * (vp_size or 1)
    if num_layers % chunks:
        raise ValueError(f"{num_layers} layers do not split over {pp_size} stages x {vp_size or 1} chunks")
    per_chunk = num_layers // chunks
    start = ((vp_rank or 0) * pp_size + pp_rank) * per_chunk
    return start, start + per_chunk


def mark_pipeline_replicated(module: torch.nn.Module) -> None:
    for param in module.parameters():
        setattr(param, PIPELINE_REPLICATED, True)


def _grad_of(param: torch.Tensor):
    """megatron DDP accumulates into ``main_grad``; plain autograd into ``grad``."""
    return param.main_grad if hasattr(param, "main_grad") else param.grad


def _named_grads(model_chunks: Sequence[torch.nn.Module], predicate) -> Dict[str, List[torch.Tensor]]:
    grads: Dict[str, List[torch.Tensor]] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            grad = _grad_of(param)
            if param.requires_grad and grad is not None and predicate(param):
                grads.setdefault(name, []).append(grad)
    return grads


def _all_reduce_in_place(tensors: List[torch.Tensor], group) -> None:
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for tensor, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(synced)


def reduce_pipeline_replicated_grads(model_chunks: Iterable[torch.nn.Module]) -> None:
    """Sum the gradients of pipeline-replicated parameters over all chunks of all pipeline stages."""
    from megatron.core import parallel_state

    chunks = list(model_chunks)
    group = parallel_state.get_pipeline_model_parallel_group()
    grads = _named_grads(chunks, lambda p: getattr(p, PIPELINE_REPLICATED, False))
    if not grads or (group.size() == 1 and all(len(g) == 1 for g in grads.values())):
        return
    names = sorted(grads)  # the same order on every stage: the embedders are the same modules
    firsts = [grads[name][0] for name in names]
    for name, first in zip(names, firsts):
        for other in grads[name][1:]:  # virtual chunks of this rank
            first.add_(other)
    if group.size() > 1:
        _all_reduce_in_place(firsts, group)
    for name, first in zip(names, firsts):
        for other in grads[name][1:]:
            other.copy_(first)


def reduce_sequence_parallel_grads(model_chunks: Iterable[torch.nn.Module], sequence_parallel: bool) -> None:
    """Sum over TP the gradients of parameters that saw only this rank's tokens (no-op without SP)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if not sequence_parallel or group.size() == 1:
        return
    grads = _named_grads(list(model_chunks), lambda p: getattr(p, "sequence_parallel", False))
    _all_reduce_in_place([g for name in sorted(grads) for g in grads[name]], group)


def reduce_replicated_grads(model_chunks: Iterable[torch.nn.Module]) -> None:
    """Both reductions, for a training step that does not use megatron's finalize_model_grads."""
    chunks = list(model_chunks)
    if not chunks:
        return
    reduce_pipeline_replicated_grads(chunks)
    reduce_sequence_parallel_grads(chunks, bool(getattr(chunks[0].config, "sequence_parallel", False)))
