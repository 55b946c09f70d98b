"""CogVideoX's layer specs: the BF16 spec and the QAT spec are the same tree with different linear classes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_qvgen.config import QuantConfig
from megatron_qvgen.models.common.attention import AttentionSubmodules, SDPACoreAttention
from megatron_qvgen.models.common.linears import LinearSpecs, linears_for
from megatron_qvgen.models.common.norms import HeadLayerNorm


@dataclass
class CogVideoXBlockSubmodules:
    linears: LinearSpecs
    attention: AttentionSubmodules


@dataclass
class CogVideoXSubmodules:
    """The linear classes (embedders and head use them too) and the block spec."""

    linears: LinearSpecs
    block: ModuleSpec


def cogvideox_spec(linears: LinearSpecs) -> ModuleSpec:
    from megatron_qvgen.models.cogvideox.block import CogVideoXBlock
    from megatron_qvgen.models.cogvideox.model import CogVideoXModel

    # q/k LayerNorm per head with one affine shared by the heads (diffusers qk_norm="layer_norm").
    attention = AttentionSubmodules(core_attention=ModuleSpec(SDPACoreAttention),
                                    q_norm=ModuleSpec(HeadLayerNorm), k_norm=ModuleSpec(HeadLayerNorm))
    block = ModuleSpec(CogVideoXBlock, submodules=CogVideoXBlockSubmodules(linears=linears, attention=attention))
    return ModuleSpec(CogVideoXModel, submodules=CogVideoXSubmodules(linears=linears, block=block))


def get_cogvideox_spec(kind: str = "bf16", quant: Optional[QuantConfig] = None) -> ModuleSpec:
    return cogvideox_spec(linears_for(kind, quant))
