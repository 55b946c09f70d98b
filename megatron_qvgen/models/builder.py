"""Build one model chunk (pipeline stage) of any supported architecture."""
from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.transformer.spec_utils import build_module

from megatron_qvgen.config import ConfigError, ModelConfig, ParallelConfig, QuantConfig
from megatron_qvgen.models.common.megatron_config import transformer_config


def build_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, spec: str = "bf16",
                quant: Optional[QuantConfig] = None, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None, params_dtype: torch.dtype = torch.float32,
                recompute: bool = False, vp_stage: Optional[int] = None,
                use_cpu_initialization: Optional[bool] = None, perform_initialization: bool = True):
    """One model chunk of this rank: a MegatronModule with ``set_input_tensor`` and
    ``forward(latents, timestep, text_embeds)``.

    ``pre_process`` / ``post_process`` default to whether this chunk is the first / last of the
    pipeline. Call after ``megatron_qvgen.parallel.initialize_parallel``. Sizes that do not divide
    raise ConfigError before anything is allocated. ``perform_initialization=False`` skips random
    initialisation when weights are loaded right after (large models).
    """
    from megatron.core import parallel_state

    config = transformer_config(model_cfg, parallel_cfg, params_dtype=params_dtype, recompute=recompute,
                                use_cpu_initialization=use_cpu_initialization,
                                perform_initialization=perform_initialization)
    if parallel_state.get_tensor_model_parallel_world_size() != parallel_cfg.tensor_parallel or \
            parallel_state.get_pipeline_model_parallel_world_size() != parallel_cfg.pipeline_parallel:
        raise ConfigError("parallel config does not match the initialised megatron parallel state "
                          f"(TP={parallel_state.get_tensor_model_parallel_world_size()}, "
                          f"PP={parallel_state.get_pipeline_model_parallel_world_size()}); call "
                          "megatron_qvgen.parallel.initialize_parallel with the same ParallelConfig")
    vp_size = parallel_cfg.virtual_pipeline if (parallel_cfg.virtual_pipeline or 1) > 1 else None
    if vp_size is not None and vp_stage is None:
        raise ConfigError("with parallel.virtual_pipeline, build each chunk with vp_stage=0..V-1 "
                          "(or use build_model_chunks)")
    first_chunk = vp_stage in (None, 0)
    last_chunk = vp_stage is None or vp_stage == vp_size - 1
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True) and first_chunk
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and last_chunk
    groups = quant.num_timestep_groups if (spec == "qat" and quant is not None) else None
    model_spec = _spec_for(model_cfg, spec, quant)
    model = build_module(model_spec, config, model_cfg=model_cfg, pre_process=pre_process,
                         post_process=post_process, recompute=recompute, vp_stage=vp_stage,
                         num_timestep_groups=groups)
    if torch.cuda.is_available() and any(p.device.type == "cpu" for p in model.parameters()):
        model.cuda(torch.cuda.current_device())
    return model


def build_model_chunks(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, **kwargs) -> List[torch.nn.Module]:
    """All chunks of this rank: one, or ``virtual_pipeline`` of them for the interleaved schedule."""
    vp_size = parallel_cfg.virtual_pipeline if (parallel_cfg.virtual_pipeline or 1) > 1 else None
    if vp_size is None:
        return [build_model(model_cfg, parallel_cfg, **kwargs)]
    return [build_model(model_cfg, parallel_cfg, vp_stage=v, **kwargs) for v in range(vp_size)]


def _spec_for(model_cfg: ModelConfig, spec: str, quant: Optional[QuantConfig]):
    if model_cfg.arch == "wan":
        from megatron_qvgen.models.wan.spec import get_wan_spec

        return get_wan_spec(spec, quant)
    if model_cfg.arch == "cogvideox":
        from megatron_qvgen.models.cogvideox.spec import get_cogvideox_spec

        return get_cogvideox_spec(spec, quant)
    raise ConfigError(f"model.arch {model_cfg.arch!r} has no megatron implementation yet")
