"""What every video model's pipeline stage does the same way, whatever the architecture.

A stage holds a contiguous run of blocks (``stage_layers``), embedders replicated on every stage (built
with the same CPU-seeded weights everywhere and tagged for the gradient reduction), takes the previous
stage's activations through ``set_input_tensor`` (megatron's schedules), binds the QAT timestep groups
for its forward, runs its blocks with optional activation recompute, and describes its tensors for
dist checkpoints under diffusers' names with blocks at their global index.

Subclasses name the attribute holding their blocks (``BLOCKS``) and their replicated children
(``REPLICATED``). Wan and CogVideoX are built on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import make_viewless_tensor

from megatron_qvgen.models.common.pipeline import mark_pipeline_replicated, stage_layers
from megatron_qvgen.models.common.sharded_state import (module_sharded_state_dict, own_sharded_tensors,
                                                        set_pipeline_replica)
from megatron_qvgen.quant.context import bind_current_context, quant_context


class VideoModelStage(MegatronModule):
    BLOCKS: str = "blocks"
    REPLICATED: Tuple[str, ...] = ()

    def __init__(self, config, *, num_layers: int, pre_process: bool, post_process: bool, recompute: bool,
                 vp_stage: Optional[int], num_timestep_groups: Optional[int]):
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.vp_stage = vp_stage
        self.pre_process, self.post_process = pre_process, post_process
        self.recompute = recompute
        self.num_timestep_groups = num_timestep_groups
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        vp_size = config.virtual_pipeline_model_parallel_size
        self.layer_start, self.layer_end = stage_layers(num_layers, pp_size, pp_rank, vp_size, vp_stage)
        # Only the first chunk of the first stage writes the replicated embedders to checkpoints.
        self.pipeline_replica = pp_rank * (vp_size or 1) + (vp_stage or 0)
        self.input_tensor: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ construction
    def build_replicated(self, factory: Callable[[object], torch.nn.Module]) -> torch.nn.Module:
        """An embedder that lives on every stage: initialised on the CPU from the run's seed, whatever
        this rank built before, so every copy starts equal; tagged for the gradient reduction."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(torch.initial_seed())
            module = factory(dataclasses.replace(self.config, use_cpu_initialization=True))
        mark_pipeline_replicated(module)
        return module

    # ------------------------------------------------------------------ pipeline plumbing
    def set_input_tensor(self, input_tensor: Union[torch.Tensor, Sequence[torch.Tensor], None]) -> None:
        """megatron's schedules hand the previous stage's output here (a list of one tensor)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"{type(self).__name__} takes one input tensor per stage, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def quant_scope(self, timestep: torch.Tensor):
        """The QAT context of this forward: each sample's activation-clip group from its timestep."""
        if self.num_timestep_groups is None:
            return contextlib.nullcontext()
        from qvgen_kernels.codes import timestep_group

        return quant_context(timestep_groups=timestep_group(timestep, self.num_timestep_groups))

    def stage_input(self, embed: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The first stage embeds its inputs; later ones take the previous stage's activations."""
        if self.pre_process:
            return embed()
        if self.input_tensor is None:
            raise RuntimeError("a non-first pipeline stage needs set_input_tensor() before forward")
        return self.input_tensor

    @staticmethod
    def stage_output(x: torch.Tensor) -> torch.Tensor:
        """Activations handed to the next stage (megatron's p2p wants a viewless tensor)."""
        return make_viewless_tensor(x, requires_grad=True, keep_graph=True)

    def run_blocks(self, x: torch.Tensor, run_block: Callable[..., torch.Tensor],
                   differentiable: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``run_block(block, x, *differentiable)`` for every block; with recompute each block is
        replayed in backward. Tensors needing gradients go through ``differentiable`` (megatron's
        checkpoint passes gradients only to arguments); the QAT context is re-bound for the replay."""
        checkpointing = self.recompute and torch.is_grad_enabled()
        for block in getattr(self, self.BLOCKS):
            if checkpointing:
                run = bind_current_context(lambda h, *extra, _block=block: run_block(_block, h, *extra))
                x = tensor_parallel.checkpoint(run, False, x, *differentiable)
            else:
                x = run_block(block, x, *differentiable)
        return x

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """megatron dist-checkpoint description; checkpoint keys are diffusers' parameter names."""
        if sharded_offsets:
            raise ValueError(f"{type(self).__name__} places its blocks itself; sharded_offsets are not supported")
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = own_sharded_tensors(self, prefix, prefix, metadata)
        for name, child in self.named_children():
            if name == self.BLOCKS:
                for i, block in enumerate(child):
                    out.update(module_sharded_state_dict(block, f"{prefix}{name}.{i}.",
                                                         f"{prefix}{name}.{self.layer_start + i}.", metadata))
                continue
            described = module_sharded_state_dict(child, f"{prefix}{name}.", f"{prefix}{name}.", metadata)
            if name in self.REPLICATED:
                set_pipeline_replica(described, self.pipeline_replica)
            out.update(described)
        return out
