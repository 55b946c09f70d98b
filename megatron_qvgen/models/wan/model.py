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

import contextlib
import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import make_viewless_tensor

from megatron_qvgen.config import WanConfig
from megatron_qvgen.models.common.adaln import conditioning_for_tokens, modulate
from megatron_qvgen.models.common.linears import build_column, linear_out
from megatron_qvgen.models.common.norms import FP32LayerNorm
from megatron_qvgen.models.common.pipeline import mark_pipeline_replicated, stage_layers
from megatron_qvgen.models.common.sharded_state import (module_sharded_state_dict, own_sharded_tensors,
                                                        set_pipeline_replica)
from megatron_qvgen.models.wan.conditioning import WanConditionEmbedder, WanConditioning, WanRotaryTables
from megatron_qvgen.models.wan.spec import WanSubmodules
from megatron_qvgen.quant.context import bind_current_context, quant_context


class WanModel(MegatronModule):
    def __init__(self, config, submodules: WanSubmodules, *, model_cfg: WanConfig, pre_process: bool = True,
                 post_process: bool = True, recompute: bool = False, vp_stage: Optional[int] = None,
                 num_timestep_groups: Optional[int] = None):
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.vp_stage = vp_stage
        self.model_cfg = model_cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.recompute = recompute
        self.num_timestep_groups = num_timestep_groups
        self.patch_size = model_cfg.patch_size
        h = model_cfg.hidden_size
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        vp_size = config.virtual_pipeline_model_parallel_size
        self.layer_start, self.layer_end = stage_layers(model_cfg.num_layers, pp_size, pp_rank, vp_size, vp_stage)
        # Only the first chunk of the first stage writes the replicated embedders to checkpoints.
        self.pipeline_replica = pp_rank * (vp_size or 1) + (vp_stage or 0)

        # The replicated embedders start equal on every stage and chunk: initialised on the CPU from the
        # run's seed, whatever this rank built before.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(torch.initial_seed())
            self.condition_embedder = WanConditionEmbedder(
                dataclasses.replace(config, use_cpu_initialization=True), submodules.linears, model_cfg)
        mark_pipeline_replicated(self.condition_embedder)
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
        self.input_tensor: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ pipeline plumbing
    def set_input_tensor(self, input_tensor: Union[torch.Tensor, Sequence[torch.Tensor], None]) -> None:
        """megatron's schedules hand the previous stage's output here (a list of one tensor)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"WanModel takes one input tensor per stage, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # ------------------------------------------------------------------ forward
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """latents (B, C, F, H, W); timestep (B,); text_embeds (B, L, text_dim).

        Returns the prediction (B, C_out, F, H, W) on the last stage, else this stage's [s, b, h] output.
        """
        grid = self._token_grid(latents)
        groups = None
        if self.num_timestep_groups is not None:
            from qvgen_kernels.codes import timestep_group

            groups = timestep_group(timestep, self.num_timestep_groups)
        scope = quant_context(timestep_groups=groups) if groups is not None else contextlib.nullcontext()
        with scope:
            cond = self._conditioning(grid, timestep, text_embeds, latents.device)
            if self.pre_process:
                x = self._embed_patches(latents)
            else:
                if self.input_tensor is None:
                    raise RuntimeError("a non-first pipeline stage needs set_input_tensor() before forward")
                x = self.input_tensor
            x = self._run_blocks(x, cond)
            if not self.post_process:
                return make_viewless_tensor(x, requires_grad=True, keep_graph=True)
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

    def _run_blocks(self, x: torch.Tensor, cond: WanConditioning) -> torch.Tensor:
        checkpointing = self.recompute and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                # Tensors needing gradients go in as arguments; the QAT context is re-bound for the replay.
                def run(h, context, timestep_proj, temb, _block=block):
                    return _block(h, WanConditioning(temb=temb, timestep_proj=timestep_proj, context=context,
                                                     rotary=cond.rotary, grid=cond.grid))

                x = tensor_parallel.checkpoint(bind_current_context(run), False, x, cond.context,
                                               cond.timestep_proj, cond.temb)
            else:
                x = block(x, cond)
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

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """megatron dist-checkpoint description; checkpoint keys are diffusers' parameter names."""
        if sharded_offsets:
            raise ValueError("WanModel places its blocks itself; sharded_offsets are not supported")
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = own_sharded_tensors(self, prefix, prefix, metadata)
        for name, child in self.named_children():
            if name == "blocks":
                for i, block in enumerate(child):
                    out.update(module_sharded_state_dict(block, f"{prefix}blocks.{i}.",
                                                         f"{prefix}blocks.{self.layer_start + i}.", metadata))
                continue
            described = module_sharded_state_dict(child, f"{prefix}{name}.", f"{prefix}{name}.", metadata)
            if name == "condition_embedder":
                set_pipeline_replica(described, self.pipeline_replica)
            out.update(described)
        return out

