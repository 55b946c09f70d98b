"""QVGen quantisation-aware training: quantizers, QAT parallel linears, distributed SVD, rank decay."""
from __future__ import annotations

from typing import Iterable, Iterator, List, Union

import torch
from torch import nn

from megatron_qvgen.quant.context import QuantContext, bind_current_context, current_quant_context, quant_context
from megatron_qvgen.quant.linear import QuantColumnParallelLinear, QuantRowParallelLinear, is_quantized_name

QUANT_LINEAR_TYPES = (QuantColumnParallelLinear, QuantRowParallelLinear)


def quant_linears(models: Union[nn.Module, Iterable[nn.Module]]) -> Iterator[nn.Module]:
    """Every quantised linear of a model (or of a list of model chunks), in module order."""
    chunks = [models] if isinstance(models, nn.Module) else list(models)
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, QUANT_LINEAR_TYPES) and module.quantized:
                yield module


@torch.no_grad()
def initialize_quantizers(models: Union[nn.Module, Iterable[nn.Module]]) -> int:
    """PTQ step 0: clip search + auxiliary SVD in every quantised linear. Returns how many were initialised."""
    count = 0
    for layer in quant_linears(models):
        layer.initialize_quantization()
        count += 1
    return count


__all__ = [
    "QUANT_LINEAR_TYPES", "QuantColumnParallelLinear", "QuantContext", "QuantRowParallelLinear",
    "bind_current_context", "current_quant_context", "initialize_quantizers", "is_quantized_name",
    "quant_context", "quant_linears",
]
