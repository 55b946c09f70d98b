"""Wan 2.1 text-to-video transformer as a megatron-core pipeline stage.

Every stage takes the raw inputs ``(latents, timestep, text_embeds)`` in diffusers' layouts and rebuilds
the conditioning from them; the first stage embeds the latent patches, later stages read the previous
stage's [s, b, h] activations through ``set_input_tensor`` (megatron's schedules), and the last stage
returns the prediction as diffusers does, (B, C, F, H, W). With sequence parallelism the activations
between blocks and stages are token-sharded over TP.

Parameter names (and checkpoint keys) are diffusers' ``WanTransformer3DModel`` names; blocks carry their
global index.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.spec_utils import build_module

from megatron_qvgen.config import WanConfig
from megatron_qvgen.models.common.adaln import conditioning_for_tokens, modulate
from megatron_qvgen.models.common.linears import build_column, linear_out
from megatron_qvgen.models.common.norms import FP32LayerNorm
from megatron_qvgen.models.common.stage import VideoModelStage
from megatron_qvgen.models.wan.conditioning import WanConditionEmbedder, WanConditioning, WanRotaryTables
from megatron_qvgen.models.wan.spec import WanSubmodules


class WanModel(VideoModelStage):
    REPLICATED = ("condition_embedder",)

    def __init__(self, config, submodules: WanSubmodules, *, model_cfg: WanConfig, pre_process: bool = True,
                 post_process: bool = True, recompute: bool = False, vp_stage: Optional[int] = None,
                 num_timestep_groups: Optional[int] = None):
        super().__init__(config, num_layers=model_cfg.num_layers, pre_process=pre_process,
                         post_process=post_process, recompute=recompute, vp_stage=vp_stage,
                         num_timestep_groups=num_timestep_groups)
        self.model_cfg = model_cfg
        self.patch_size = model_cfg.patch_size
        h = model_cfg.hidden_size
        self.condition_embedder = self.build_replicated(
            lambda cfg: WanConditionEmbedder(cfg, submodules.linears, model_cfg))
        self.rotary = WanRotaryTables(model_cfg.attention_head_dim)

        if pre_process:
            self.patch_embedding = torch.nn.Conv3d(model_cfg.in_channels, h, kernel_size=self.patch_size,
                                                   stride=self.patch_size, dtype=config.params_dtype)
        self.blocks = torch.nn.ModuleList([
            build_module(submodules.block, config, model_cfg=model_cfg, layer_number=i)
            for i in range(self.layer_start, self.layer_end)])
        if post_process:
            self.norm_out = FP32LayerNorm(h, model_cfg.eps, False, config)
            self.proj_out = build_column(submodules.linears.column, h,
                                         model_cfg.out_channels * math.prod(self.patch_size),
                                         name="proj_out", config=config, gather_output=True)
            self.scale_shift_table = torch.nn.Parameter(torch.randn(1, 2, h, dtype=config.params_dtype) / h ** 0.5)

    # ------------------------------------------------------------------ forward
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """latents (B, C, F, H, W); timestep (B,); text_embeds (B, L, text_dim).

        Returns the prediction (B, C_out, F, H, W) on the last stage, else this stage's [s, b, h] output.
        """
        grid = self._token_grid(latents)
        with self.quant_scope(timestep):
            cond = self._conditioning(grid, timestep, text_embeds, latents.device)
            x = self.stage_input(lambda: self._embed_patches(latents))
            # Tensors needing gradients go through run_blocks' differentiable arguments (recompute).
            x = self.run_blocks(x, lambda block, h, context, timestep_proj, temb: block(h, WanConditioning(
                temb=temb, timestep_proj=timestep_proj, context=context, rotary=cond.rotary, grid=cond.grid)),
                (cond.context, cond.timestep_proj, cond.temb))
            if not self.post_process:
                return self.stage_output(x)
            return self._head(x, cond, latents.shape)

    def _token_grid(self, latents: torch.Tensor):
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
        _, channels, *sizes = latents.shape
        if channels != self.model_cfg.in_channels:
            raise ValueError(f"latents have {channels} channels, the model expects {self.model_cfg.in_channels}")
        if any(n % p for n, p in zip(sizes, self.patch_size)):
            raise ValueError(f"latent size (F, H, W) = {tuple(sizes)} is not divisible by patch {self.patch_size}")
        grid = tuple(n // p for n, p in zip(sizes, self.patch_size))
        if max(grid) > self.model_cfg.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={self.model_cfg.rope_max_seq_len}")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if self.config.sequence_parallel and math.prod(grid) % tp:
            raise ValueError(f"sequence parallelism needs the {math.prod(grid)} video tokens to divide by TP={tp}")
        return grid

    def _conditioning(self, grid, timestep, text_embeds, device) -> WanConditioning:
        batch = text_embeds.shape[0]
        timestep = torch.as_tensor(timestep, device=device).reshape(-1)
        if timestep.numel() != batch:
            raise ValueError(f"one timestep per sample expected: got {timestep.numel()} for batch {batch}")
        text = text_embeds.transpose(0, 1).to(self.config.params_dtype)  # [L, b, text_dim]
        temb, timestep_proj, context = self.condition_embedder(timestep, text)
        return WanConditioning(temb=temb, timestep_proj=timestep_proj, context=context,
                               rotary=self.rotary(grid, device), grid=grid)

    def _embed_patches(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))  # (B, h, F', H', W')
        x = x.flatten(2).permute(2, 0, 1).contiguous()                             # [s, b, h]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x

    def _head(self, x: torch.Tensor, cond: WanConditioning, shape) -> torch.Tensor:
        mod = self.scale_shift_table.float() + cond.temb.float().unsqueeze(1)  # [b, 2, h]
        shift, scale = conditioning_for_tokens(mod, self.config.sequence_parallel).unbind(1)
        x = modulate(self.norm_out(x.float()), shift, scale).type_as(x)
        out = linear_out(self.proj_out, x)  # [s, b, C_out * pt * ph * pw], all tokens on every rank
        batch, _, frames, height, width = shape
        pt, ph, pw = self.patch_size
        out = out.transpose(0, 1).reshape(batch, frames // pt, height // ph, width // pw, pt, ph, pw, -1)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
