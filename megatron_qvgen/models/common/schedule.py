"""Run micro-batches of a video model through megatron's pipeline schedules (1F1B or interleaved).

Every stage gets the raw inputs of every micro-batch (it rebuilds the conditioning from them); only the
first stage embeds the latents. Used by the parity tests, the conversion verifier and the GPU parity
benchmark; a training step with its own loss can pass ``loss_fn``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch

Batch = Dict[str, torch.Tensor]  # latents (B, C, F, H, W), timestep (B,), text_embeds (B, L, D)


def video_tokens(model_chunk: torch.nn.Module, latents_shape: Sequence[int]) -> int:
    """Video tokens of one sample; ``latents_shape`` in the model's input layout.

    A model whose layout is not (B, C, F, H, W) (CogVideoX: (B, F, C, H, W)) defines ``video_tokens``.
    """
    model = getattr(model_chunk, "module", model_chunk)  # DDP-wrapped chunks too
    if hasattr(model, "video_tokens"):
        return model.video_tokens(latents_shape)
    patch = model.patch_size
    patch = patch if isinstance(patch, tuple) else (1, patch, patch)
    return math.prod(n // p for n, p in zip(latents_shape[2:], patch))


def stage_sequence_length(model_chunk: torch.nn.Module, batch: Batch) -> int:
    """Tokens of the activations passed between pipeline stages: the video tokens, or a model's own
    count (``sequence_length``: CogVideoX passes its joint [text; video] sequence)."""
    model = getattr(model_chunk, "module", model_chunk)
    if hasattr(model, "sequence_length"):
        return model.sequence_length(batch["latents"].shape, batch["text_embeds"].shape)
    return video_tokens(model_chunk, batch["latents"].shape)


def run_pipeline(model_chunks: List[torch.nn.Module], microbatches: List[Batch], *,
                 loss_fn: Optional[Callable[[torch.Tensor, Batch], torch.Tensor]] = None,
                 forward_only: bool = False) -> List[torch.Tensor]:
    """Forward (and backward unless ``forward_only``) of all micro-batches; returns the last stage's
    detached predictions, one per micro-batch (an empty list on other stages).

    ``loss_fn(prediction, batch)`` gives each micro-batch's loss; megatron divides it by the number of
    micro-batches before the backward. Gradients accumulate in the parameters as usual.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("run_pipeline needs at least one micro-batch")
    shapes = {tuple(mb["latents"].shape) for mb in microbatches}
    if len(shapes) != 1:
        raise ValueError(f"all micro-batches of one schedule must share a latent shape, got {sorted(shapes)}")
    shape = shapes.pop()
    lengths = {stage_sequence_length(model_chunks[0], mb) for mb in microbatches}
    if len(lengths) != 1:
        raise ValueError(f"all micro-batches of one schedule must share a sequence length, got {sorted(lengths)}")
    outputs: List[torch.Tensor] = []

    def loss_func(batch: Batch, prediction: torch.Tensor):
        outputs.append(prediction.detach())
        loss = loss_fn(prediction, batch) if loss_fn is not None else prediction.sum() * 0.0
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        prediction = model(batch["latents"], batch["timestep"], batch["text_embeds"])
        return prediction, partial(loss_func, batch)

    iterators = [iter(microbatches) for _ in model_chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches),
        seq_length=lengths.pop(),
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )
    return outputs
