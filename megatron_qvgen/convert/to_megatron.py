"""diffusers transformer folder -> megatron dist checkpoint, streamed tensor by tensor.

The torch_dist format stores each tensor whole with its global shape and megatron reshards it at load
time, so the checkpoint is the same for every TP/PP: ``tensor_parallel`` / ``pipeline_parallel`` only
check, before anything is written, that the model can be split that way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from megatron_qvgen.config import ConfigError, check_model_parallel
from megatron_qvgen.convert.diffusers_io import SafetensorsSource, read_model_config, transformer_dir
from megatron_qvgen.convert.checkpoint_io import write_streaming
from megatron_qvgen.convert.errors import ConversionError
from megatron_qvgen.convert.tables import table_for


@dataclass
class ConversionSummary:
    destination: Path
    tensors: int
    parameters: int
    model_cfg: object


def diffusers_to_megatron(src: str | os.PathLike, dst: str | os.PathLike, *, arch: str = "wan",
                          tensor_parallel: int = 1, pipeline_parallel: int = 1,
                          progress: bool = True) -> ConversionSummary:
    folder = transformer_dir(src)
    model_cfg = read_model_config(folder, arch)
    try:
        check_model_parallel(model_cfg, tensor_parallel, pipeline_parallel)
    except ConfigError as exc:
        raise ConversionError(f"{folder}: this model cannot run at --tp {tensor_parallel} --pp "
                              f"{pipeline_parallel}: {exc}") from None
    table = table_for(arch)
    source = SafetensorsSource(folder)
    table.check_keys(model_cfg, source.shapes(), side="diffusers", where=str(folder))
    entries = table.entries(model_cfg)
    tensors = [(e.megatron, e.shape, source.dtype(e.diffusers), partial(source.get, e.diffusers)) for e in entries]
    written = write_streaming(dst, tensors, model_cfg, progress=progress)
    return ConversionSummary(written, len(entries), table.parameter_count(model_cfg), model_cfg)
