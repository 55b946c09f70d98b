"""The megatron-core TransformerConfig a model stage is built with.

megatron's linears, schedules, DDP and optimizer read their settings from one TransformerConfig; this is
the only place that translates our dataclass configs into it, with the flags that must be off on CPU
(fusions would make megatron torch.compile; gradient_accumulation_fusion needs a CUDA extension).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_qvgen.config import ConfigError, ModelConfig, ParallelConfig, check_model_parallel


def transformer_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *,
                       params_dtype: torch.dtype = torch.float32, recompute: bool = False,
                       use_cpu_initialization: Optional[bool] = None, perform_initialization: bool = True):
    """Check the sizes, then build megatron's config for one model (every stage shares it).

    ``use_cpu_initialization`` (default: True without a GPU) builds each full weight on the CPU and
    slices it, so random weights are the same for every TP size.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_model_parallel(model_cfg, parallel_cfg.tensor_parallel, parallel_cfg.pipeline_parallel,
                         parallel_cfg.virtual_pipeline)
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    interleaved = parallel_cfg.virtual_pipeline is not None and parallel_cfg.virtual_pipeline > 1
    extra = {}
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        kv_channels=model_cfg.attention_head_dim,
        ffn_hidden_size=model_cfg.ffn_dim,
        tensor_model_parallel_size=parallel_cfg.tensor_parallel,
        pipeline_model_parallel_size=parallel_cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline if interleaved else None,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        # megatron-core 0.16 gives wrong gradients with interleaving and batched p2p (MCORE_ON_CPU.md).
        batch_p2p_comm=not interleaved,
        overlap_p2p_comm=interleaved,
        cuda_graph_scope=[],
        **extra,
    )


def without_sequence_parallel(config):
    """The same config for linears whose input has no token dimension to shard (timestep, text).

    Their inputs are replicated on every TP rank; sequence parallelism applies to video tokens only.
    """
    if not config.sequence_parallel:
        return config
    return dataclasses.replace(config, sequence_parallel=False)
