"""Conditioning embedders shared by the video models: sinusoidal timestep features and 2-layer MLPs.

The MLPs are tensor-parallel (column -> activation -> row), their linears named like diffusers'
``TimestepEmbedding`` / ``PixArtAlphaTextProjection`` (``linear_1``, ``linear_2``) so parameter names
map one to one. Their inputs (a timestep vector [b, f], or text [L, b, d]) have no video-token
dimension, so they are built with sequence parallelism off.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_qvgen.models.common.linears import LinearSpecs, build_column, build_row, linear_out
from megatron_qvgen.models.common.megatron_config import without_sequence_parallel

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                                  downscale_freq_shift: float = 0.0, max_period: float = 10000.0,
                                  scale: float = 1.0) -> torch.Tensor:
    """[b] timesteps (fractional allowed) -> [b, dim] float32 features, diffusers' convention.

    Frequencies ``exp(-ln(max_period) * i / (dim/2 - shift))``; halves ordered cos|sin when flipped.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [batch], got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    angles = scale * (timesteps[:, None].float() * freqs[None, :])
    first, second = (angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos())
    emb = torch.cat((first, second), dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class MLPEmbedder(MegatronModule):
    """linear_1 (column) -> activation -> linear_2 (row): output replicated on every TP rank."""

    def __init__(self, config, linears: LinearSpecs, in_features: int, hidden_size: int, *,
                 activation: str, name: str, out_features: int | None = None):
        super().__init__(config)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        cfg = without_sequence_parallel(config)
        self.activation = ACTIVATIONS[activation]
        self.linear_1 = build_column(linears.column, in_features, hidden_size, name=f"{name}.linear_1",
                                     config=cfg)
        self.linear_2 = build_row(linears.row, hidden_size, out_features or hidden_size,
                                  name=f"{name}.linear_2", config=cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_out(self.linear_2, self.activation(linear_out(self.linear_1, x)))
