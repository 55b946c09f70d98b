"""The embedded dataset: moving-shape videos as latent shards, deterministic from a seed.

Latents are made either directly at the latent resolution (a fixed projection of rendered frames into
C channels: colour, motion and edges; no weights needed) or by rendering full-size frames and encoding
them with a diffusers VAE. Text is embedded by the built-in hash encoder or a pretrained one.
Sample i depends only on (seed, i): shards can be made in any order, and a rerun writes identical bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from megatron_qvgen.config.data import DataConfig
from megatron_qvgen.config.errors import ConfigError
from megatron_qvgen.data.errors import DatasetError
from megatron_qvgen.data.latent_norm import LatentNorm
from megatron_qvgen.data.manifest import MANIFEST_NAME, DatasetManifest, read_dataset_manifest, write_dataset_manifest
from megatron_qvgen.data.schema import SampleMeta
from megatron_qvgen.data.shard_index import read_shard_index
from megatron_qvgen.data.shard_writer import ShardWriter
from megatron_qvgen.data.synthetic_scenes import random_scene, render_scene
from megatron_qvgen.data.text_encoders import HashCaptionEncoder

GENERATOR = "megatron_qvgen.data.make_synthetic_shards"
PROJECTION_NAME = "synthetic-projection-v1"
_PROJECTION_SEED = 20250511
_NUM_FEATURES = 8


@dataclass(frozen=True)
class SyntheticSpec:
    num_samples: int = 64
    samples_per_shard: int = 8
    latent_channels: int = 16
    # Latent frames, height and width (with a VAE, the video is rendered at the size that encodes to this).
    frames: int = 3
    height: int = 16
    width: int = 16
    text_len: int = 16
    text_dim: int = 32
    seed: int = 0
    fps: float = 16.0
    max_objects: int = 2
    shard_prefix: str = "synthetic"

    def __post_init__(self):
        for name in ("num_samples", "samples_per_shard", "latent_channels", "frames", "height", "width",
                     "text_dim", "max_objects"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"synthetic {name} must be a positive integer, got {value!r}")
        if not isinstance(self.text_len, int) or self.text_len < 2:
            raise ValueError(f"synthetic text_len must be an integer >= 2, got {self.text_len!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"synthetic seed must be a non-negative integer, got {self.seed!r}")
        if not self.fps > 0:
            raise ValueError(f"synthetic fps must be positive, got {self.fps}")
        if not self.shard_prefix.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"synthetic shard_prefix must be letters, digits, _ or -, got {self.shard_prefix!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def latent_features(video: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] in [0, 1] -> [8, F, H, W]: centred colour, its change from the previous frame, edges."""
    rgb = video.transpose(3, 0, 1, 2) - 0.5
    motion = np.zeros_like(rgb)
    motion[:, 1:] = rgb[:, 1:] - rgb[:, :-1]
    luminance = rgb.mean(axis=0)
    grad_y, grad_x = np.gradient(luminance, axis=(1, 2)) if min(luminance.shape[1:]) > 1 else (
        np.zeros_like(luminance), np.zeros_like(luminance))
    return np.concatenate([rgb, motion, grad_y[None], grad_x[None]]).astype(np.float32)


def _projection(channels: int) -> np.ndarray:
    projection = np.random.default_rng(_PROJECTION_SEED).standard_normal((channels, _NUM_FEATURES))
    return (2.5 / np.sqrt(_NUM_FEATURES) * projection).astype(np.float32)


def project_to_latent(video: np.ndarray, channels: int) -> np.ndarray:
    """A fixed linear map of the features into ``channels`` latent channels (same for every dataset)."""
    return np.einsum("ck,kfhw->cfhw", _projection(channels), latent_features(video)).astype(np.float32)


def latent_to_rgb(latent: np.ndarray) -> np.ndarray:
    """The way back for looking at samples: a projection latent [C, F, H, W] -> colours [F, H, W, 3] in [0, 1].

    Least squares through the fixed projection recovers the features (exactly for a clean latent when
    C >= 8); the first three are the centred colour.
    """
    channels, frames, height, width = latent.shape
    features = np.linalg.lstsq(_projection(channels).astype(np.float64),
                               latent.reshape(channels, -1).astype(np.float64), rcond=None)[0]
    rgb = features[:3].reshape(3, frames, height, width).transpose(1, 2, 3, 0) + 0.5
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def make_synthetic_shards(out_dir: str, spec: SyntheticSpec, vae=None, text_encoder=None,
                          progress: bool = True, workers: int = 1) -> DatasetManifest:
    """Write ``spec.num_shards`` shards, then dataset.json; skips shards already written by the same spec.

    ``vae``: a :class:`VideoVAE` (else the latent-space projection); ``text_encoder``: an encoder with
    ``encode(captions)`` and ``describe()`` (else :class:`HashCaptionEncoder`). ``workers`` > 1 writes shards in
    that many forked processes (the projection and hash encoder only: a model stays in one process); the bytes
    are the same, since a sample depends on (seed, i) alone. On a lent GPU this turns a minute into seconds.
    """
    text_encoder = text_encoder or HashCaptionEncoder(spec.text_len, spec.text_dim)
    if (text_encoder.text_len, text_encoder.text_dim) != (spec.text_len, spec.text_dim):
        raise ValueError(f"the text encoder gives ({text_encoder.text_len}, {text_encoder.text_dim}) embeddings, "
                         f"the spec asks for ({spec.text_len}, {spec.text_dim})")
    if vae is not None and vae.latent_channels != spec.latent_channels:
        raise ValueError(f"the VAE has {vae.latent_channels} latent channels, the spec asks for {spec.latent_channels}")
    if workers > 1 and (vae is not None or not isinstance(text_encoder, HashCaptionEncoder)):
        raise ValueError("workers > 1 needs the built-in projection and hash text encoder (no models)")
    manifest = DatasetManifest(
        latent_channels=spec.latent_channels, text_len=spec.text_len, text_dim=spec.text_dim,
        vae=vae.describe() if vae is not None else {"name": PROJECTION_NAME, "features": _NUM_FEATURES},
        text_encoder=text_encoder.describe(),
        latent_norm=(vae.norm if vae is not None else LatentNorm("none")).to_dict(),
        info={"generator": GENERATOR, "spec": dataclasses.asdict(spec), "spec_digest": spec.digest()})
    _check_existing_manifest(out_dir, manifest)
    os.makedirs(out_dir, exist_ok=True)
    bar = tqdm(total=spec.num_samples, desc="synthetic samples", unit="sample", disable=not progress)
    job = (out_dir, spec, manifest, vae, text_encoder)
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for written in pool.imap_unordered(_write_shard_job, [(job, s) for s in range(spec.num_shards)]):
                bar.update(written)
    else:
        for shard in range(spec.num_shards):
            bar.update(_write_shard(*job, shard))
    bar.close()
    empty = text_encoder.encode([""])[0]
    write_dataset_manifest(out_dir, manifest, empty)
    return manifest


def _write_shard_job(args) -> int:
    job, shard = args
    torch.set_num_threads(1)
    return _write_shard(*job, shard)


def _write_shard(out_dir: str, spec: SyntheticSpec, manifest: DatasetManifest, vae, text_encoder, shard: int) -> int:
    """Write shard ``shard`` unless the same spec wrote it already; returns its sample count."""
    first = shard * spec.samples_per_shard
    ids = range(first, min(first + spec.samples_per_shard, spec.num_samples))
    path = os.path.join(out_dir, f"{spec.shard_prefix}-{shard:06d}.tar")
    sources = [f"synthetic:{spec.digest()}:{i}" for i in ids]
    if os.path.exists(path):
        if read_shard_index(path).sources != tuple(sources):
            raise DatasetError(f"{path} exists but was not made by this synthetic spec; use another directory")
        return len(ids)
    scenes = [random_scene(np.random.default_rng([spec.seed, i]), spec.max_objects) for i in ids]
    texts = text_encoder.encode([s.caption() for s in scenes])
    with ShardWriter(path, sources=sources) as writer:
        for i, scene, text in zip(ids, scenes, texts):
            latent, frames, size = _latent_of(scene, spec, vae)
            meta = SampleMeta(caption=scene.caption(), frames=frames, size=size, fps=spec.fps,
                              latent_shape=latent.shape, text_shape=text.shape, vae=manifest.vae,
                              text_encoder=manifest.text_encoder, latent_norm=manifest.latent_norm,
                              source=sources[i - first])
            writer.add(f"{i:08d}", latent, text, meta)
    return len(ids)


def _latent_of(scene, spec: SyntheticSpec, vae):
    if vae is None:
        video = render_scene(scene, spec.frames, spec.height, spec.width, supersample=4)
        return project_to_latent(video, spec.latent_channels), spec.frames, (spec.height, spec.width)
    frames, height, width = vae.pixel_shape(spec.frames, spec.height, spec.width)
    video = render_scene(scene, frames, height, width, supersample=2)
    pixels = torch.from_numpy(video).permute(3, 0, 1, 2) * 2 - 1
    latent = vae.encode(pixels).numpy()
    return latent, frames, (height, width)


def _check_existing_manifest(out_dir: str, manifest: DatasetManifest) -> None:
    if not os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        return
    existing, _ = read_dataset_manifest(out_dir)
    if existing.info.get("spec_digest") != manifest.info["spec_digest"] or existing.identity() != manifest.identity():
        raise DatasetError(f"{os.path.join(out_dir, MANIFEST_NAME)} describes other data than this synthetic spec; "
                           "write to another directory")


def ensure_synthetic_dataset(cfg: DataConfig, latent_channels: int, text_len: int, text_dim: int,
                             progress: bool = False) -> Optional[DatasetManifest]:
    """With ``cfg.synthesize_if_missing``: make the embedded dataset at ``cfg.shards`` unless it is there.

    Safe to call on every rank at once (identical bytes, atomic renames); barrier before building loaders.
    A directory holding other data (a dataset.json not made by the generator) is left untouched.
    """
    if not cfg.synthesize_if_missing:
        return None
    if any(ch in cfg.shards for ch in "*?[{"):
        raise ConfigError(f"data.synthesize_if_missing needs data.shards to be a directory, got {cfg.shards!r}")
    path = os.path.join(cfg.shards, MANIFEST_NAME)
    if os.path.exists(path):
        existing, _ = read_dataset_manifest(cfg.shards)
        if existing.info.get("generator") != GENERATOR:
            return None
    frames, height, width = cfg.synthetic_latent_size
    spec = SyntheticSpec(num_samples=cfg.synthetic_samples, samples_per_shard=cfg.synthetic_samples_per_shard,
                         latent_channels=latent_channels, frames=frames, height=height, width=width,
                         text_len=text_len, text_dim=text_dim, seed=cfg.synthetic_seed)
    return make_synthetic_shards(cfg.shards, spec, progress=progress)
