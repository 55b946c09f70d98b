"""CogVideoX (1.0: 2B with 3D sin-cos positions, 5B with 3D RoPE) as a megatron-core pipeline stage.

Every stage takes the raw inputs ``(latents, timestep, text_embeds)`` in diffusers' layouts (latents
(B, F, C, H, W)) and rebuilds the time embedding and the position tables from them. The first stage
builds the joint [text; video] sequence; every stage passes that whole sequence on (token-sharded over
TP under sequence parallelism); the last stage applies ``norm_final``, ``norm_out`` (adaLN from the time
embedding) and ``proj_out`` and returns the video tokens' prediction as diffusers does, (B, F, C, H, W).
The 5B model's rotary tables are computed here from the token grid, as diffusers' pipeline computes the
``image_rotary_emb`` it hands its transformer.

Parameter names (and checkpoint keys) are diffusers' ``CogVideoXTransformer3DModel`` names; blocks
carry their global index.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megatron_qvgen.config import CogVideoXConfig
from megatron_qvgen.models.cogvideox.block import JointLayout
from megatron_qvgen.models.cogvideox.embeddings import CogVideoXPatchEmbed, CogVideoXTimeEmbedding
from megatron_qvgen.models.cogvideox.positions import GridTables, rotary_tables, sincos_table
from megatron_qvgen.models.cogvideox.spec import CogVideoXSubmodules
from megatron_qvgen.models.common.adaln import build_modulation_projection, conditioning_for_tokens, modulate
from megatron_qvgen.models.common.linears import LinearSpecs, build_column, linear_out
from megatron_qvgen.models.common.norms import FP32LayerNorm
from megatron_qvgen.models.common.stage import VideoModelStage


class OutputAdaLayerNorm(MegatronModule):
    """diffusers' ``AdaLayerNorm`` of CogVideoX's head (chunk_dim=1): shift then scale from the time embedding."""

    def __init__(self, config, linears: LinearSpecs, conditioning_size: int, hidden_size: int, eps: float):
        super().__init__(config)
        self.linear = build_modulation_projection(linears, conditioning_size, 2, hidden_size, name="norm_out.linear",
                                                  config=config)
        self.norm = FP32LayerNorm(hidden_size, eps, True, config)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        mod = linear_out(self.linear, F.silu(temb)).unflatten(-1, (2, -1))
        shift, scale = conditioning_for_tokens(mod, self.config.sequence_parallel).unbind(1)
        return modulate(self.norm(x), shift, scale)


class CogVideoXModel(VideoModelStage):
    BLOCKS = "transformer_blocks"
    REPLICATED = ("time_embedding",)

    def __init__(self, config, submodules: CogVideoXSubmodules, *, model_cfg: CogVideoXConfig,
                 pre_process: bool = True, post_process: bool = True, recompute: bool = False,
                 vp_stage: Optional[int] = None, num_timestep_groups: Optional[int] = None):
        super().__init__(config, num_layers=model_cfg.num_layers, pre_process=pre_process,
                         post_process=post_process, recompute=recompute, vp_stage=vp_stage,
                         num_timestep_groups=num_timestep_groups)
        self.model_cfg = model_cfg
        self.patch_size = model_cfg.patch_size
        h, linears = model_cfg.hidden_size, submodules.linears
        self.time_embedding = self.build_replicated(lambda cfg: CogVideoXTimeEmbedding(cfg, linears, model_cfg))
        if model_cfg.use_rotary_positional_embeddings:
            self.positions = GridTables(partial(rotary_tables, model_cfg))
        else:  # cast once from float64 to the activation dtype, as diffusers casts its table
            self.positions = GridTables(lambda grid: sincos_table(model_cfg, grid).to(config.params_dtype))
        if pre_process:
            self.patch_embed = CogVideoXPatchEmbed(config, linears, model_cfg)
        self.transformer_blocks = torch.nn.ModuleList([
            build_module(submodules.block, config, model_cfg=model_cfg, layer_number=i)
            for i in range(self.layer_start, self.layer_end)])
        if post_process:
            self.norm_final = FP32LayerNorm(h, model_cfg.norm_eps, True, config)
            self.norm_out = OutputAdaLayerNorm(config, linears, model_cfg.time_embed_dim, h, model_cfg.norm_eps)
            self.proj_out = build_column(linears.column, h, model_cfg.out_channels * model_cfg.patch_size ** 2,
                                         name="proj_out", config=config, gather_output=True)

    # ------------------------------------------------------------------ sizes
    def video_tokens(self, latents_shape) -> int:
        """Video tokens of latents shaped (B, F, C, H, W)."""
        _, frames, _, height, width = latents_shape
        return frames * (height // self.patch_size) * (width // self.patch_size)

    def sequence_length(self, latents_shape, text_shape) -> int:
        """Tokens passed between pipeline stages: the joint [text; video] sequence."""
        return text_shape[1] + self.video_tokens(latents_shape)

    # ------------------------------------------------------------------ forward
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """latents (B, F, C, H, W); timestep (B,); text_embeds (B, L, text_embed_dim).

        Returns the prediction (B, F, C_out, H, W) on the last stage, else this stage's [s, b, h] output.
        """
        grid = self._token_grid(latents, text_embeds)
        text_len = text_embeds.shape[1]
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1)
        if timestep.numel() != latents.shape[0]:
            raise ValueError(f"one timestep per sample expected: got {timestep.numel()} for batch {latents.shape[0]}")
        with self.quant_scope(timestep):
            temb = self.time_embedding(timestep)
            rope = self.model_cfg.use_rotary_positional_embeddings
            layout = JointLayout(text_tokens=self._local_text_tokens(text_len, text_len + math.prod(grid)),
                                 rotary=self.positions(grid, latents.device) if rope else None)
            x = self.stage_input(lambda: self._embed(
                latents, text_embeds, None if rope else self.positions(grid, latents.device)))
            x = self.run_blocks(x, lambda block, h, t: block(h, t, layout), (temb,))
            if not self.post_process:
                return self.stage_output(x)
            return self._head(x, temb, latents.shape, text_len)

    def _token_grid(self, latents: torch.Tensor, text_embeds: torch.Tensor):
        cfg = self.model_cfg
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, F, C, H, W), got shape {tuple(latents.shape)}")
        batch, frames, channels, height, width = latents.shape
        if channels != cfg.in_channels:
            raise ValueError(f"latents have {channels} channels (dim 2 of (B, F, C, H, W)), the model expects "
                             f"{cfg.in_channels}")
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"latent size (H, W) = {(height, width)} is not divisible by patch {cfg.patch_size}")
        if text_embeds.ndim != 3 or text_embeds.shape[0] != batch or text_embeds.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"text_embeds must be (B={batch}, L, {cfg.text_embed_dim}), "
                             f"got {tuple(text_embeds.shape)}")
        grid = (frames, height // cfg.patch_size, width // cfg.patch_size)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tokens = text_embeds.shape[1] + frames * grid[1] * grid[2]
        if self.config.sequence_parallel and tokens % tp:
            raise ValueError(f"sequence parallelism needs the {tokens} text + video tokens to divide by TP={tp}")
        return grid

    def _local_text_tokens(self, text_len: int, tokens: int) -> int:
        """Text tokens at the start of this rank's slice of the joint sequence (all of them without SP)."""
        if not self.config.sequence_parallel:
            return text_len
        local = tokens // parallel_state.get_tensor_model_parallel_world_size()
        start = parallel_state.get_tensor_model_parallel_rank() * local
        return max(0, min(text_len - start, local))

    def _embed(self, latents, text_embeds, video_positions) -> torch.Tensor:
        text = text_embeds.transpose(0, 1).to(self.config.params_dtype)  # [L, b, text_dim]
        x = self.patch_embed(latents, text, video_positions)
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x

    def _head(self, x: torch.Tensor, temb: torch.Tensor, shape, text_len: int) -> torch.Tensor:
        x = self.norm_out(self.norm_final(x), temb)
        # Every token goes through proj_out (under SP its input is all-gathered); text rows are dropped after.
        out = linear_out(self.proj_out, x)[text_len:]  # [F*H'*W', b, C_out * p * p]
        batch, frames, _, height, width = shape
        p = self.patch_size
        out = out.transpose(0, 1).reshape(batch, frames, height // p, width // p, -1, p, p)
        return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
