"""A diffusers video VAE from a local folder: pixels [-1, 1] -> stored (normalized) latents.

The posterior's mode is stored (deterministic: re-encoding a video gives the same latent). The
normalization applied is recorded in the data (``LatentNorm``) so the latents can be decoded again.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch

from megatron_qvgen.config.errors import ConfigError
from megatron_qvgen.data.latent_norm import LatentNorm
from megatron_qvgen.data.text_encoders import file_digest

SUPPORTED_VAES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")


class VideoVAE:
    def __init__(self, vae_dir: str, device=None, dtype: torch.dtype = torch.float32, tiling: bool = False):
        import diffusers

        config_path = os.path.join(vae_dir, "config.json")
        try:
            with open(config_path) as f:
                class_name = json.load(f).get("_class_name")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"VAE folder {vae_dir} has no readable config.json: {exc}") from None
        if class_name not in SUPPORTED_VAES:
            raise ConfigError(f"{config_path}: VAE class {class_name!r} is not one of {SUPPORTED_VAES}")
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.model = getattr(diffusers, class_name).from_pretrained(vae_dir, use_safetensors=True, torch_dtype=dtype)
        self.model.to(self.device).eval()
        if tiling:
            self.model.enable_tiling()
        self.class_name = class_name
        self._config_digest = file_digest(config_path)
        cfg = self.model.config
        if class_name == "AutoencoderKLWan":
            self.latent_channels = int(cfg.z_dim)
            self.temporal_compression = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
            self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1) * int(cfg.patch_size or 1)
            mean, std = list(cfg.latents_mean), list(cfg.latents_std)
            if len(mean) != self.latent_channels or len(std) != self.latent_channels:
                raise ConfigError(f"{config_path}: latents_mean/latents_std have {len(mean)}/{len(std)} values "
                                 f"for z_dim={self.latent_channels}")
            self.norm = LatentNorm("per_channel", mean=tuple(mean), std=tuple(std))
        else:
            self.latent_channels = int(cfg.latent_channels)
            self.temporal_compression = int(cfg.temporal_compression_ratio)
            self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
            self.norm = LatentNorm("scale", scale=float(cfg.scaling_factor))

    def describe(self) -> Dict[str, Any]:
        return {"name": self.class_name, "config_sha256": self._config_digest, "posterior": "mode",
                "temporal_compression": self.temporal_compression, "spatial_compression": self.spatial_compression}

    def check_video_shape(self, frames: int, height: int, width: int) -> None:
        t, s = self.temporal_compression, self.spatial_compression
        if (frames - 1) % t:
            raise ConfigError(f"{self.class_name} encodes 1 + {t}k frames, got {frames}")
        if height % s or width % s:
            raise ConfigError(f"{self.class_name} needs height and width divisible by {s}, got {height}x{width}")

    def latent_shape(self, frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        self.check_video_shape(frames, height, width)
        s = self.spatial_compression
        return (self.latent_channels, (frames - 1) // self.temporal_compression + 1, height // s, width // s)

    def pixel_shape(self, latent_frames: int, latent_height: int, latent_width: int) -> Tuple[int, int, int]:
        """The video (frames, height, width) that encodes to the given latent size."""
        s = self.spatial_compression
        return (latent_frames - 1) * self.temporal_compression + 1, latent_height * s, latent_width * s

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video float [3, F, H, W] in [-1, 1] -> stored latent float32 [C, F', H', W']."""
        if video.dim() != 4 or video.shape[0] != 3:
            raise ValueError(f"expected a video [3, F, H, W], got {tuple(video.shape)}")
        self.check_video_shape(*video.shape[1:])
        with torch.no_grad():
            x = video.unsqueeze(0).to(self.device, self.dtype)
            z = self.model.encode(x).latent_dist.mode().float()
        return self.norm.normalize(z, channel_dim=1)[0].cpu()
