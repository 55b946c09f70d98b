"""Wan 2.1 text-to-video transformer on megatron-core (TP / SP / PP), equal to diffusers'."""
from megatron_qvgen.models.wan.conditioning import WanConditionEmbedder, WanConditioning
from megatron_qvgen.models.wan.model import WanModel
from megatron_qvgen.models.wan.spec import get_wan_spec, wan_spec

__all__ = ["WanConditionEmbedder", "WanConditioning", "WanModel", "get_wan_spec", "wan_spec"]
