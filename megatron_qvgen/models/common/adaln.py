"""adaLN conditioning: per-sample shift/scale/gate vectors applied to [s, b, h] token activations.

Modulation vectors come from the timestep, are the same on every TP rank and multiply the token
activations. Under sequence parallelism each rank holds only its token shard, so its gradient with
respect to those vectors is partial: ``conditioning_for_tokens`` marks the boundary (identity forward,
sum over TP in backward) so everything upstream (tables, the time projection, the time embedder) gets
the full gradient on every rank.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region


def conditioning_for_tokens(vectors: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Pass TP-replicated conditioning into computation on (possibly token-sharded) activations."""
    return copy_to_tensor_model_parallel_region(vectors) if sequence_parallel else vectors


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with x [s, b, h] and per-sample shift/scale [b, h]."""
    return x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0)


def gated(update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """update * gate with a per-sample gate [b, h]."""
    return update * gate.unsqueeze(0)


def build_modulation_projection(linears, conditioning_size: int, num_vectors: int, hidden_size: int, *,
                                name: str, config):
    """Linear from a conditioning vector to ``num_vectors`` modulation vectors of ``hidden_size``.

    Column-parallel with the output gathered: every rank needs all vectors for its tokens. Its input
    has no token dimension, so it is built with sequence parallelism off.
    """
    from megatron_qvgen.models.common.linears import build_column
    from megatron_qvgen.models.common.megatron_config import without_sequence_parallel

    return build_column(linears.column, conditioning_size, num_vectors * hidden_size, name=name,
                        config=without_sequence_parallel(config), gather_output=True)
