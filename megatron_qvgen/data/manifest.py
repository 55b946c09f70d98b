"""``dataset.json`` and ``empty_prompt.npy``: what every shard of one directory shares.

Written once beside the shards by the tools that write them. The loader refuses a directory without
them (it could neither check shapes nor drop captions), and checks each sample's json against them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from megatron_qvgen.data.atomic import atomic_write_bytes
from megatron_qvgen.data.errors import BadSample, DatasetError
from megatron_qvgen.data.latent_norm import LatentNorm
from megatron_qvgen.data.schema import SCHEMA_VERSION, SampleMeta, decode_npy, encode_npy, has_non_finite

MANIFEST_NAME = "dataset.json"
EMPTY_PROMPT_NAME = "empty_prompt.npy"
FORMAT = "qvgen-latent-dataset"


@dataclass(frozen=True)
class DatasetManifest:
    latent_channels: int
    text_len: int
    text_dim: int
    vae: Dict[str, Any]
    text_encoder: Dict[str, Any]
    latent_norm: Dict[str, Any]
    empty_prompt: str = EMPTY_PROMPT_NAME
    schema_version: int = SCHEMA_VERSION
    # Free-form facts for people (generator arguments, command line); never compared.
    info: Dict[str, Any] = field(default_factory=dict)
    # Every setting that shaped the samples (frames, size, fps, text length, model files, dtypes, shard size):
    # a writer adding to this directory refuses other settings. Not part of identity(): directories made
    # with other settings (e.g. another resolution) can still be read together, bucketed by shape.
    settings: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("latent_channels", "text_len", "text_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version!r}, this code knows {SCHEMA_VERSION}")
        norm = LatentNorm.from_dict(self.latent_norm)
        if norm.channels is not None and norm.channels != self.latent_channels:
            raise ValueError(f"latent_norm has {norm.channels} channels, the latents {self.latent_channels}")
        for name in ("vae", "text_encoder"):
            if not isinstance(getattr(self, name), dict) or not isinstance(getattr(self, name).get("name"), str):
                raise ValueError(f"{name} must be an object with a 'name'")
        if not isinstance(self.settings, dict):
            raise ValueError(f"settings must be an object, got {self.settings!r}")
        if os.path.basename(self.empty_prompt) != self.empty_prompt:
            raise ValueError(f"empty_prompt must be a file name beside the manifest, got {self.empty_prompt!r}")

    @property
    def norm(self) -> LatentNorm:
        return LatentNorm.from_dict(self.latent_norm)

    def identity(self) -> Tuple:
        """What two directories must share to be read as one dataset."""
        return (self.schema_version, self.latent_channels, self.text_len, self.text_dim,
                json.dumps(self.vae, sort_keys=True), json.dumps(self.text_encoder, sort_keys=True),
                json.dumps(self.latent_norm, sort_keys=True))

    def meta_mismatch(self, meta: SampleMeta) -> Optional[str]:
        """Why a sample's json does not belong to this dataset, or None."""
        for name in ("vae", "text_encoder", "latent_norm"):
            if getattr(meta, name) != getattr(self, name):
                return f"{name} {getattr(meta, name)!r} differs from the dataset's {getattr(self, name)!r}"
        return None

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "schema_version": self.schema_version, "latent_channels": self.latent_channels,
            "text_len": self.text_len, "text_dim": self.text_dim, "vae": self.vae,
            "text_encoder": self.text_encoder, "latent_norm": self.latent_norm,
            "empty_prompt": self.empty_prompt, "info": self.info, "settings": self.settings,
        }, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetManifest":
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        d.pop("format")
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        return cls(**d)


def write_dataset_manifest(directory: str, manifest: DatasetManifest, empty_prompt: np.ndarray) -> str:
    """Write the empty-prompt embedding, then the manifest that names it (both atomically)."""
    expected = (manifest.text_len, manifest.text_dim)
    if tuple(empty_prompt.shape) != expected:
        raise ValueError(f"empty-prompt embedding has shape {tuple(empty_prompt.shape)}, expected {expected}")
    os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(os.path.join(directory, manifest.empty_prompt), encode_npy(empty_prompt.astype(np.float16)))
    path = os.path.join(directory, MANIFEST_NAME)
    atomic_write_bytes(path, manifest.to_json().encode("utf-8"))
    return path


def read_dataset_manifest(directory: str) -> Tuple[DatasetManifest, np.ndarray]:
    """The manifest of a shard directory and its empty-prompt embedding (L, D) float16; errors name the file."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DatasetError(f"{path} is missing: every shard directory needs the {MANIFEST_NAME} and "
                           f"{EMPTY_PROMPT_NAME} that data/prepare_latents.py and data/make_synthetic.py write")
    try:
        with open(path, "rb") as f:
            manifest = DatasetManifest.from_json(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path} is not a valid dataset manifest: {exc}") from None
    prompt_path = os.path.join(directory, manifest.empty_prompt)
    try:
        with open(prompt_path, "rb") as f:
            empty = decode_npy(bytearray(f.read()), prompt_path)
    except OSError as exc:
        raise DatasetError(f"{prompt_path} (the empty-prompt embedding) cannot be read: {exc}") from None
    except BadSample as exc:
        raise DatasetError(f"{prompt_path} (the empty-prompt embedding) is corrupt: {exc}") from None
    expected = (manifest.text_len, manifest.text_dim)
    if empty.dtype != np.float16 or empty.shape != expected or has_non_finite(empty):
        raise DatasetError(f"{prompt_path} must be finite float16 of shape {expected}, got {empty.dtype} "
                           f"{empty.shape}")
    return manifest, empty
