"""The two linear kinds every transformer linear is built from, and the spec choosing their classes.

The BF16 and the QAT spec differ ONLY in these classes: the bf16 classes below are megatron's
column/row-parallel linears that also accept the diffusers-style ``name`` the QAT classes
(``megatron_qvgen.quant.linear``) need for include/exclude patterns and export, so one builder call
constructs either. Outputs include the bias (``skip_bias_add=False``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           set_tensor_model_parallel_attributes)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


class NamedColumnParallelLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear that remembers its diffusers-style module name."""

    def __init__(self, input_size: int, output_size: int, *, name: str, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self.quant_name = name  # the attribute name the QAT linears use


class NamedRowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear that remembers its diffusers-style module name."""

    def __init__(self, input_size: int, output_size: int, *, name: str, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self.quant_name = name  # the attribute name the QAT linears use


@dataclass
class LinearSpecs:
    """Which classes build column- and row-parallel linears (with their extra constructor params)."""

    column: ModuleSpec
    row: ModuleSpec


def bf16_linears() -> LinearSpecs:
    return LinearSpecs(column=ModuleSpec(NamedColumnParallelLinear), row=ModuleSpec(NamedRowParallelLinear))


def qat_linears(quant) -> LinearSpecs:
    """Fake-quantized linears of the QAT spec (the lead's megatron_qvgen.quant.linear)."""
    from megatron_qvgen.quant.linear import QuantColumnParallelLinear, QuantRowParallelLinear

    return LinearSpecs(column=ModuleSpec(QuantColumnParallelLinear, params={"quant": quant}),
                       row=ModuleSpec(QuantRowParallelLinear, params={"quant": quant}))


SPEC_KINDS = ("bf16", "qat")


def linears_for(kind: str = "bf16", quant=None) -> LinearSpecs:
    """The linear classes of a model spec by name: ``"bf16"`` (teacher) or ``"qat"`` (student, needs ``quant``)."""
    from megatron_qvgen.config import ConfigError

    if kind not in SPEC_KINDS:
        raise ConfigError(f"spec must be one of {SPEC_KINDS}, got {kind!r}")
    if kind == "qat":
        if quant is None:
            raise ConfigError("the 'qat' spec needs a QuantConfig (quant=...)")
        return qat_linears(quant)
    return bf16_linears()


def build_column(spec: ModuleSpec, input_size: int, output_size: int, *, name: str, config,
                 bias: bool = True, gather_output: bool = False):
    """Output features sharded over TP (all of them on every rank when ``gather_output``)."""
    layer = build_module(spec, input_size, output_size, config=config, init_method=config.init_method,
                         bias=bias, gather_output=gather_output, skip_bias_add=False, name=name)
    _mark_sharded(layer, partition_dim=0)
    return layer


def build_row(spec: ModuleSpec, input_size: int, output_size: int, *, name: str, config, bias: bool = True):
    """Input features sharded over TP; the input is already parallel (a column-parallel output)."""
    layer = build_module(spec, input_size, output_size, config=config,
                         init_method=config.output_layer_init_method, bias=bias, input_is_parallel=True,
                         skip_bias_add=False, name=name)
    _mark_sharded(layer, partition_dim=1)
    return layer


def _mark_sharded(layer: torch.nn.Module, partition_dim: int) -> None:
    # megatron sets these only when it initialises the weight; the gradient-norm and checkpoint code
    # need them also when weights are loaded instead (perform_initialization=False).
    weight = getattr(layer, "weight", None)
    if weight is not None and not getattr(weight, "tensor_model_parallel", False):
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(weight, attr):
                delattr(weight, attr)
        set_tensor_model_parallel_attributes(weight, True, partition_dim, 1)


def linear_out(layer, x: torch.Tensor) -> torch.Tensor:
    """megatron linears return (output, bias); with skip_bias_add=False the bias is already added."""
    out, _ = layer(x)
    return out
