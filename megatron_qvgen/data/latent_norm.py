"""How stored latents relate to the VAE's raw latents, recorded with the data so they can be decoded.

- ``per_channel`` (Wan): stored = (z - mean) / std, per latent channel (diffusers ``latents_mean/std``).
- ``scale`` (CogVideoX): stored = z * scale (diffusers ``scaling_factor``).
- ``none``: stored = z (the synthetic latent-space generator, whose latents are already unit scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

NORM_KINDS = ("none", "per_channel", "scale")


@dataclass(frozen=True)
class LatentNorm:
    kind: str = "none"
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    scale: Optional[float] = None

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"latent_norm.kind must be one of {NORM_KINDS}, got {self.kind!r}")
        if self.kind == "per_channel":
            if not self.mean or not self.std or len(self.mean) != len(self.std):
                raise ValueError("latent_norm per_channel needs mean and std lists of one length")
            if min(self.std) <= 0:
                raise ValueError("latent_norm std must be positive")
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.kind == "scale":
            if self.scale is None or not float(self.scale) > 0:
                raise ValueError(f"latent_norm scale must be positive, got {self.scale!r}")
            object.__setattr__(self, "scale", float(self.scale))

    @property
    def channels(self) -> Optional[int]:
        return len(self.mean) if self.kind == "per_channel" else None

    def _per_channel(self, z: torch.Tensor, channel_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = [1] * z.dim()
        shape[channel_dim] = -1
        mean = torch.tensor(self.mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std

    def normalize(self, z: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """Raw VAE latent -> stored latent."""
        if self.kind == "per_channel":
            mean, std = self._per_channel(z, channel_dim)
            return (z - mean) / std
        if self.kind == "scale":
            return z * self.scale
        return z

    def denormalize(self, x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """Stored latent -> what the VAE decoder takes."""
        if self.kind == "per_channel":
            mean, std = self._per_channel(x, channel_dim)
            return x * std + mean
        if self.kind == "scale":
            return x / self.scale
        return x

    def to_dict(self) -> Dict[str, Any]:
        if self.kind == "per_channel":
            return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}
        if self.kind == "scale":
            return {"kind": self.kind, "scale": self.scale}
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LatentNorm":
        if not isinstance(d, dict) or "kind" not in d:
            raise ValueError(f"latent_norm must be an object with a 'kind', got {d!r}")
        unknown = set(d) - {"kind", "mean", "std", "scale"}
        if unknown:
            raise ValueError(f"latent_norm has unknown fields {sorted(unknown)}")
        return cls(kind=d["kind"], mean=d.get("mean"), std=d.get("std"), scale=d.get("scale"))
