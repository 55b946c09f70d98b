"""Wan's conditioning: built once at the start of every pipeline stage's forward from the raw inputs.

``WanConditionEmbedder`` holds diffusers' ``condition_embedder`` (sinusoidal timestep features ->
``time_embedder`` MLP -> SiLU -> ``time_proj`` to the six adaLN vectors; ``text_embedder`` MLP on the
text-encoder states). It is replicated on every pipeline stage; its parameters are tagged
``pipeline_replicated`` by the model so their gradients are summed over stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_qvgen.config import WanConfig
from megatron_qvgen.models.common.adaln import build_modulation_projection
from megatron_qvgen.models.common.embeddings import MLPEmbedder, sinusoidal_timestep_embedding
from megatron_qvgen.models.common.linears import LinearSpecs, linear_out
from megatron_qvgen.models.common.rope import rope_3d, wan_axis_dims

NUM_BLOCK_MODULATIONS = 6  # shift, scale, gate of self-attention; shift, scale, gate of the FFN


@dataclass(frozen=True)
class WanConditioning:
    """Everything a block and the head need besides the token activations."""

    temb: torch.Tensor                          # [b, h] time embedding (output modulation)
    timestep_proj: torch.Tensor                 # [b, 6, h] block modulation before each block's table
    context: torch.Tensor                       # [L, b, h] projected text, full on every TP rank
    rotary: Tuple[torch.Tensor, torch.Tensor]   # cos, sin [tokens, head_dim] of the whole sequence
    grid: Tuple[int, int, int]                  # tokens along frames, height, width


class WanConditionEmbedder(MegatronModule):
    def __init__(self, config, linears: LinearSpecs, model_cfg: WanConfig):
        super().__init__(config)
        h = model_cfg.hidden_size
        self.freq_dim = model_cfg.freq_dim
        self.time_embedder = MLPEmbedder(config, linears, model_cfg.freq_dim, h, activation="silu",
                                         name="condition_embedder.time_embedder")
        self.time_proj = build_modulation_projection(linears, h, NUM_BLOCK_MODULATIONS, h,
                                                     name="condition_embedder.time_proj", config=config)
        self.text_embedder = MLPEmbedder(config, linears, model_cfg.text_dim, h, activation="gelu_tanh",
                                         name="condition_embedder.text_embedder")

    def forward(self, timestep: torch.Tensor, text: torch.Tensor):
        """timestep [b]; text [L, b, text_dim] -> temb [b, h], timestep_proj [b, 6, h], context [L, b, h]."""
        features = sinusoidal_timestep_embedding(timestep, self.freq_dim, flip_sin_to_cos=True,
                                                 downscale_freq_shift=0)
        temb = self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype)).type_as(text)
        timestep_proj = linear_out(self.time_proj, F.silu(temb)).unflatten(-1, (NUM_BLOCK_MODULATIONS, -1))
        return temb, timestep_proj, self.text_embedder(text)


class WanRotaryTables:
    """cos/sin tables of the last grid seen (every micro-batch of a run usually shares one shape)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        self.axis_dims = wan_axis_dims(head_dim)
        self.theta = theta
        self._cached: Optional[Tuple[Tuple[int, int, int], torch.device, Tuple[torch.Tensor, torch.Tensor]]] = None

    def __call__(self, grid: Tuple[int, int, int], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._cached is not None and self._cached[0] == grid and self._cached[1] == device:
            return self._cached[2]
        positions = [torch.arange(n) for n in grid]
        cos, sin = rope_3d(positions, self.axis_dims, self.theta)
        tables = (cos.to(device), sin.to(device))
        self._cached = (grid, device, tables)
        return tables
