"""CogVideoX's embedders: the joint [text; video] input sequence (first stage) and the time embedding
(every stage).

``CogVideoXPatchEmbed`` mirrors diffusers' (CogVideoX 1.0, ``patch_size_t=None``): each latent frame is
cut into p x p patches by a Conv2d (``proj``), the text-encoder states are projected by ``text_proj``
(a column-parallel linear, gathered: every rank needs the whole hidden size), and the two are joined,
text first; the 2B model adds its sin-cos table to the video tokens. The time embedding is diffusers'
``Timesteps`` (sinusoidal, hidden-size wide) followed by ``TimestepEmbedding`` (``linear_1`` -> SiLU ->
``linear_2``) into ``time_embed_dim``.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_qvgen.config import CogVideoXConfig
from megatron_qvgen.models.common.embeddings import MLPEmbedder, sinusoidal_timestep_embedding
from megatron_qvgen.models.common.linears import LinearSpecs, build_column, linear_out
from megatron_qvgen.models.common.megatron_config import without_sequence_parallel


class CogVideoXPatchEmbed(MegatronModule):
    def __init__(self, config, linears: LinearSpecs, model_cfg: CogVideoXConfig):
        super().__init__(config)
        h, p = model_cfg.hidden_size, model_cfg.patch_size
        self.proj = torch.nn.Conv2d(model_cfg.in_channels, h, kernel_size=p, stride=p, bias=model_cfg.patch_bias,
                                    dtype=config.params_dtype)
        self.text_proj = build_column(linears.column, model_cfg.text_embed_dim, h, name="patch_embed.text_proj",
                                      config=without_sequence_parallel(config), gather_output=True)

    def forward(self, latents: torch.Tensor, text: torch.Tensor,
                video_positions: Optional[torch.Tensor]) -> torch.Tensor:
        """latents (B, F, C, H, W); text [L, b, text_dim]; video_positions [F*H'*W', h] or None
        -> the joint sequence [L + F*H'*W', b, h]."""
        batch, frames, channels, height, width = latents.shape
        video = self.proj(latents.reshape(batch * frames, channels, height, width).to(self.proj.weight.dtype))
        video = video.view(batch, frames, video.shape[1], -1)        # (B, F, h, H'W')
        video = video.permute(1, 3, 0, 2).flatten(0, 1)              # [F*H'*W', b, h], frame-major
        if video_positions is not None:
            video = video + video_positions.to(video.dtype).unsqueeze(1)
        text = linear_out(self.text_proj, text.to(video.dtype))
        return torch.cat([text, video], dim=0)


class CogVideoXTimeEmbedding(MLPEmbedder):
    """timestep [b] -> temb [b, time_embed_dim]; replicated on every pipeline stage. Its linears are
    diffusers' ``time_embedding.linear_1`` / ``linear_2``."""

    def __init__(self, config, linears: LinearSpecs, model_cfg: CogVideoXConfig):
        super().__init__(config, linears, model_cfg.hidden_size, model_cfg.time_embed_dim, activation="silu",
                         name="time_embedding")
        self.features = model_cfg.hidden_size
        self.flip_sin_to_cos = model_cfg.flip_sin_to_cos
        self.freq_shift = model_cfg.freq_shift

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_timestep_embedding(timestep, self.features, flip_sin_to_cos=self.flip_sin_to_cos,
                                                 downscale_freq_shift=self.freq_shift)
        return super().forward(features.to(self.linear_1.weight.dtype))
