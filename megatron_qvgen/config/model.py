"""Architectures: field names follow diffusers' transformer configs, so conversion maps them one to one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple, Union

from megatron_qvgen.config.errors import ConfigError


def _check_positive(prefix: str, cfg, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{prefix}.{name} must be a positive integer, got {value!r}")


@dataclass
class WanConfig:
    """Wan 2.1 text-to-video transformer (diffusers ``WanTransformer3DModel``)."""

    arch: str = field(default="wan", init=False)
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    # Tokens of the text encoder output (umT5: 512).
    text_len: int = 512

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.patch_size must be three positive integers, got {self.patch_size}")
        _check_positive("model", self, ("num_attention_heads", "attention_head_dim", "in_channels",
                                        "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers",
                                        "rope_max_seq_len", "text_len"))
        if self.attention_head_dim % 2:
            raise ConfigError(f"model.attention_head_dim must be even (3D RoPE), got {self.attention_head_dim}")
        if self.freq_dim % 2:
            raise ConfigError(f"model.freq_dim must be even, got {self.freq_dim}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def diffusers_kwargs(self) -> dict:
        d = asdict(self)
        for k in ("arch", "text_len"):
            d.pop(k)
        d["qk_norm"] = "rms_norm_across_heads"
        return d


@dataclass
class CogVideoXConfig:
    """CogVideoX transformer (diffusers ``CogVideoXTransformer3DModel``): 2B sin-cos, 5B 3D RoPE."""

    arch: str = field(default="cogvideox", init=False)
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    def __post_init__(self):
        _check_positive("model", self, ("num_attention_heads", "attention_head_dim", "in_channels",
                                        "out_channels", "time_embed_dim", "text_embed_dim", "num_layers",
                                        "sample_width", "sample_height", "sample_frames", "patch_size",
                                        "temporal_compression_ratio", "max_text_seq_length"))
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ConfigError("model.use_learned_positional_embeddings needs use_rotary_positional_embeddings")
        if self.use_learned_positional_embeddings:
            raise ConfigError("model.use_learned_positional_embeddings=True (CogVideoX-5b-I2V) is not supported: "
                              "only the text-to-video CogVideoX 1.0 models are")
        # diffusers' position tables split the channels in quarters and eighths of pairs.
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
            raise ConfigError(f"model.attention_head_dim={self.attention_head_dim} must be a multiple of 16 with "
                              "use_rotary_positional_embeddings (3D RoPE splits a head 4/16 : 6/16 : 6/16)")
        if not self.use_rotary_positional_embeddings and self.hidden_size % 16:
            raise ConfigError(f"model num_attention_heads x attention_head_dim = {self.hidden_size} must be a "
                              "multiple of 16 for the 3D sin-cos positions (use_rotary_positional_embeddings=False)")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_dim(self) -> int:
        return 4 * self.hidden_size

    @property
    def text_len(self) -> int:
        return self.max_text_seq_length

    def diffusers_kwargs(self) -> dict:
        d = asdict(self)
        d.pop("arch")
        return d


ModelConfig = Union[WanConfig, CogVideoXConfig]
MODEL_CONFIGS = {"wan": WanConfig, "cogvideox": CogVideoXConfig}


def architecture_differences(stored: ModelConfig, wanted: ModelConfig) -> Dict[str, tuple]:
    """Fields in which two configs build different weights, as name -> (stored, wanted). A Wan model's text_len
    (how many text tokens the encoder pads to) shapes no weight and is not in diffusers' config, so a checkpoint
    converted from diffusers, which records the default 512, serves a recipe that pads to 32."""
    if stored.arch != wanted.arch:
        return {"arch": (stored.arch, wanted.arch)}
    a, b = stored.diffusers_kwargs(), wanted.diffusers_kwargs()
    return {k: (a.get(k), v) for k, v in b.items() if a.get(k) != v}


def model_config_from_dict(arch: str, values: dict) -> ModelConfig:
    if arch not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model arch {arch!r}; expected one of {sorted(MODEL_CONFIGS)}")
    values = {k: v for k, v in values.items() if k != "arch"}
    return MODEL_CONFIGS[arch](**values)


def check_model_parallel(model: ModelConfig, tensor_parallel: int, pipeline_parallel: int,
                         virtual_pipeline: Optional[int] = None) -> None:
    """Sizes that must divide, checked before anything is allocated."""
    tp, pp = tensor_parallel, pipeline_parallel
    if model.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
                          f"parallel.tensor_parallel={tp}")
    if model.ffn_dim % tp:
        raise ConfigError(f"model FFN size {model.ffn_dim} is not divisible by parallel.tensor_parallel={tp}")
    time_embed_dim = getattr(model, "time_embed_dim", None)  # CogVideoX's time MLP is column/row parallel
    if time_embed_dim is not None and time_embed_dim % tp:
        raise ConfigError(f"model.time_embed_dim={time_embed_dim} is not divisible by parallel.tensor_parallel={tp}")
    patch = model.patch_size
    outputs = model.out_channels * (patch[0] * patch[1] * patch[2] if isinstance(patch, tuple) else patch * patch)
    if outputs % tp:
        raise ConfigError(f"model.out_channels x patch volume = {outputs} (proj_out) is not divisible by "
                          f"parallel.tensor_parallel={tp}")
    chunks = pp * (virtual_pipeline or 1)
    if model.num_layers % chunks:
        raise ConfigError(f"model.num_layers={model.num_layers} is not divisible by pipeline stages x "
                          f"virtual chunks = {pp} x {virtual_pipeline or 1}")
    if model.num_layers < chunks:
        raise ConfigError(f"model.num_layers={model.num_layers} is smaller than the {chunks} pipeline chunks")
