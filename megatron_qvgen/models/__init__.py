"""Video diffusion transformers as megatron-core models (TP / SP / PP), equal to diffusers.

Public API (what the trainer and tools call):
- ``build_model(model_cfg, parallel_cfg, *, spec="bf16"|"qat", quant=None, pre_process=None,
  post_process=None, params_dtype=torch.float32, recompute=False, vp_stage=None, ...)`` -> one model
  chunk; ``build_model_chunks`` -> all chunks of this rank (interleaved pipelines).
  ``chunk.forward(latents, timestep, text_embeds)`` on every stage, inputs in diffusers' layouts;
  the last stage returns the prediction in diffusers' layout; ``chunk.set_input_tensor(...)`` for
  megatron's schedules; ``chunk.sharded_state_dict()`` for megatron dist_checkpointing.
- ``reduce_replicated_grads(chunks)`` after the backward of all micro-batches (pipeline-replicated
  embedders, and sequence-parallel norm/bias params), or ``reduce_pipeline_replicated_grads(chunks)``
  alone when megatron's ``finalize_model_grads`` already handles the sequence-parallel ones.
- ``stage_layers`` to know which blocks a stage holds.
"""
from megatron_qvgen.models.builder import build_model, build_model_chunks
from megatron_qvgen.models.common.pipeline import (reduce_pipeline_replicated_grads, reduce_replicated_grads,
                                                   reduce_sequence_parallel_grads, stage_layers)

__all__ = ["build_model", "build_model_chunks", "reduce_pipeline_replicated_grads", "reduce_replicated_grads",
           "reduce_sequence_parallel_grads", "stage_layers"]
