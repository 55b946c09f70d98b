"""CogVideoX 1.0 (2B sin-cos, 5B 3D RoPE) on megatron-core (TP / SP / PP), equal to diffusers'."""
from megatron_qvgen.models.cogvideox.model import CogVideoXModel
from megatron_qvgen.models.cogvideox.spec import cogvideox_spec, get_cogvideox_spec

__all__ = ["CogVideoXModel", "cogvideox_spec", "get_cogvideox_spec"]
