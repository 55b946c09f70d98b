"""Wan's layer specs: the BF16 spec and the QAT spec are the same tree with different linear classes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_qvgen.config import ConfigError, QuantConfig
from megatron_qvgen.models.common.attention import AttentionSubmodules, SDPACoreAttention
from megatron_qvgen.models.common.linears import LinearSpecs, bf16_linears, qat_linears
from megatron_qvgen.models.common.norms import DistributedRMSNorm

SPEC_KINDS = ("bf16", "qat")


@dataclass
class WanBlockSubmodules:
    linears: LinearSpecs
    self_attention: AttentionSubmodules
    cross_attention: AttentionSubmodules


@dataclass
class WanSubmodules:
    """The linear classes (embedders and head use them too) and the block spec."""

    linears: LinearSpecs
    block: ModuleSpec


def wan_spec(linears: LinearSpecs) -> ModuleSpec:
    from megatron_qvgen.models.wan.block import WanTransformerBlock
    from megatron_qvgen.models.wan.model import WanModel

    # q/k RMSNorm over all heads ("rms_norm_across_heads"): distributed over TP.
    attention = AttentionSubmodules(core_attention=ModuleSpec(SDPACoreAttention),
                                    q_norm=ModuleSpec(DistributedRMSNorm), k_norm=ModuleSpec(DistributedRMSNorm))
    block = ModuleSpec(WanTransformerBlock, submodules=WanBlockSubmodules(
        linears=linears, self_attention=attention, cross_attention=attention))
    return ModuleSpec(WanModel, submodules=WanSubmodules(linears=linears, block=block))


def get_wan_spec(kind: str = "bf16", quant: Optional[QuantConfig] = None) -> ModuleSpec:
    if kind not in SPEC_KINDS:
        raise ConfigError(f"spec must be one of {SPEC_KINDS}, got {kind!r}")
    if kind == "qat":
        if quant is None:
            raise ConfigError("the 'qat' spec needs a QuantConfig (quant=...)")
        return wan_spec(qat_linears(quant))
    return wan_spec(bf16_linears())
