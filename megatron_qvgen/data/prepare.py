"""Videos + captions -> latent shards with a diffusers VAE and a T5-family text encoder.

Videos are sorted and cut into shards of ``samples_per_shard``; shard j belongs to process
``j % world``, so processes (torchrun, SLURM array, or ``--rank/--world``) never share a shard. A shard
that exists is complete (written under a temporary name, renamed at the end) and is skipped on a
rerun, after checking it was made from the same videos. A video that cannot be used (undecodable, too
short, no caption, non-finite latent) is reported, counted and recorded in its shard's index.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from megatron_qvgen.data.errors import DatasetError
from megatron_qvgen.data.manifest import MANIFEST_NAME, DatasetManifest, read_dataset_manifest, write_dataset_manifest
from megatron_qvgen.data.schema import SampleMeta
from megatron_qvgen.data.shard_index import read_shard_index
from megatron_qvgen.data.shard_writer import ShardWriter
from megatron_qvgen.data.sources import caption_for, list_videos, load_caption_table
from megatron_qvgen.data.video_io import VideoError, read_clip

log = logging.getLogger(__name__)
GENERATOR = "megatron_qvgen.data.prepare_latent_shards"

# What each model family's pipeline feeds its transformer (diffusers conventions).
FAMILIES = {
    "wan": {"frames": 81, "height": 480, "width": 832, "fps": 16.0, "text_len": 512, "padding": "zeros",
            "vae": "AutoencoderKLWan"},
    "cogvideox": {"frames": 49, "height": 480, "width": 720, "fps": 8.0, "text_len": 226, "padding": "encoder",
                  "vae": "AutoencoderKLCogVideoX"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PrepareOptions:
    videos_dir: str
    out_dir: str
    vae_dir: str
    text_encoder_dir: str
    tokenizer_dir: str
    family: str = "wan"
    captions: Optional[str] = None          # CSV / JSONL table; None = a .txt beside each video
    frames: Optional[int] = None            # None = the family's default
    height: Optional[int] = None
    width: Optional[int] = None
    fps: Optional[float] = None             # 0 = consecutive frames at the source rate
    text_len: Optional[int] = None
    samples_per_shard: int = 64
    rank: int = 0
    world: int = 1
    device: Optional[str] = None            # None = cuda:LOCAL_RANK when present, else cpu
    vae_dtype: str = "float32"
    text_dtype: Optional[str] = None        # None = bfloat16 on GPU, float32 on CPU
    vae_tiling: bool = False
    shard_prefix: str = "shard"
    progress: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        defaults = FAMILIES[self.family]
        for name in ("frames", "height", "width", "fps", "text_len"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        for name in ("frames", "height", "width", "text_len", "samples_per_shard", "world"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.fps < 0:
            raise ValueError(f"fps must be >= 0, got {self.fps}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside [0, world={self.world})")
        for name in ("vae_dtype", "text_dtype"):
            if getattr(self, name) is not None and getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.out_dir, f"{self.shard_prefix}-{shard:06d}.tar")


@dataclass
class PrepareReport:
    shards_written: int = 0
    shards_skipped: int = 0
    samples_written: int = 0
    failures: List[Tuple[str, str]] = field(default_factory=list)   # (video, why)


def prepare_latent_shards(opts: PrepareOptions) -> PrepareReport:
    videos = list_videos(opts.videos_dir)
    if not videos:
        raise ValueError(f"no video files under {opts.videos_dir}")
    table = load_caption_table(opts.captions) if opts.captions else None
    n = opts.samples_per_shard
    shards = [videos[i:i + n] for i in range(0, len(videos), n)]
    mine = [j for j in range(len(shards)) if j % opts.world == opts.rank]
    report = PrepareReport()
    todo = []
    for j in mine:
        if os.path.exists(opts.shard_path(j)):
            index = read_shard_index(opts.shard_path(j))
            if index.sources != tuple(shards[j]):
                raise DatasetError(f"{opts.shard_path(j)} was made from other videos than the current list puts "
                                   "in it (videos were added or removed): write to a new output folder")
            report.shards_skipped += 1
        else:
            todo.append(j)
    manifest_missing = not os.path.exists(os.path.join(opts.out_dir, MANIFEST_NAME))
    if not todo and not (manifest_missing and opts.rank == 0):
        return report
    os.makedirs(opts.out_dir, exist_ok=True)
    vae, encoder = _load_models(opts)
    manifest = DatasetManifest(
        latent_channels=vae.latent_channels, text_len=opts.text_len, text_dim=encoder.text_dim, vae=vae.describe(),
        text_encoder=encoder.describe(), latent_norm=vae.norm.to_dict(),
        info={"generator": GENERATOR, "family": opts.family, "frames": opts.frames, "size": [opts.height, opts.width],
              "fps": opts.fps, "vae_dir": os.path.abspath(opts.vae_dir),
              "text_encoder_dir": os.path.abspath(opts.text_encoder_dir)})
    _check_or_write_manifest(opts, manifest, encoder)
    bar = tqdm(total=sum(len(shards[j]) for j in todo), desc=f"encode videos (rank {opts.rank})", unit="video",
               disable=not opts.progress)
    for j in todo:
        _write_shard(opts, j, shards[j], table, vae, encoder, manifest, report, bar)
    bar.close()
    return report


def _load_models(opts: PrepareOptions):
    from megatron_qvgen.data.text_encoders import PretrainedTextEncoder
    from megatron_qvgen.data.video_vae import VideoVAE

    device = opts.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    on_gpu = torch.device(device).type == "cuda"
    text_dtype = DTYPES[opts.text_dtype or ("bfloat16" if on_gpu else "float32")]
    vae = VideoVAE(opts.vae_dir, device=device, dtype=DTYPES[opts.vae_dtype], tiling=opts.vae_tiling)
    expected_vae = FAMILIES[opts.family]["vae"]
    if vae.class_name != expected_vae:
        raise ValueError(f"family {opts.family!r} uses {expected_vae}, but {opts.vae_dir} holds {vae.class_name}")
    vae.check_video_shape(opts.frames, opts.height, opts.width)
    encoder = PretrainedTextEncoder(opts.text_encoder_dir, opts.tokenizer_dir, opts.text_len,
                                    FAMILIES[opts.family]["padding"], device=device, dtype=text_dtype)
    return vae, encoder


def _check_or_write_manifest(opts: PrepareOptions, manifest: DatasetManifest, encoder) -> None:
    path = os.path.join(opts.out_dir, MANIFEST_NAME)
    if os.path.exists(path):
        existing, _ = read_dataset_manifest(opts.out_dir)
        if existing.identity() != manifest.identity():
            raise DatasetError(f"{path} was written with another VAE, text encoder or shape: use a new output folder")
    elif opts.rank == 0:
        write_dataset_manifest(opts.out_dir, manifest, encoder.encode([""])[0])


def _write_shard(opts: PrepareOptions, shard: int, videos: List[str], table, vae, encoder,
                 manifest: DatasetManifest, report: PrepareReport, bar) -> None:
    path = opts.shard_path(shard)
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # left by an interrupted run of this rank
        log.info("removing the partial shard %s", stale)
        os.remove(stale)
    fps = opts.fps or None
    with ShardWriter(path, sources=videos) as writer:
        for k, relpath in enumerate(videos):
            bar.update(1)
            caption = caption_for(opts.videos_dir, relpath, table)
            try:
                if caption is None:
                    raise VideoError(f"{relpath}: no caption (neither a .txt beside it nor a row in the table)")
                clip, clip_fps = read_clip(os.path.join(opts.videos_dir, relpath), opts.frames, opts.height,
                                           opts.width, fps)
                latent = vae.encode(clip).numpy()
                text = encoder.encode([caption])[0]
                meta = SampleMeta(caption=caption, frames=opts.frames, size=(opts.height, opts.width),
                                  fps=clip_fps, latent_shape=latent.shape, text_shape=text.shape,
                                  vae=manifest.vae, text_encoder=manifest.text_encoder,
                                  latent_norm=manifest.latent_norm, source=relpath)
                writer.add(f"{shard:06d}_{k:04d}", latent, text, meta)
            except (VideoError, ValueError) as exc:
                message = str(exc)
                report.failures.append((relpath, message))
                writer.add_failure(relpath, message)
                tqdm.write(f"skipped video {relpath}: {message}")
                continue
            report.samples_written += 1
    report.shards_written += 1

