"""Videos + captions -> latent shards with a diffusers VAE and a T5-family text encoder; rerun it at will.

- Work is split per video: video ``i`` of the sorted list is encoded by process ``i % world`` (torchrun, a
  SLURM array, or ``--rank/--world``), so every process has work from ``world`` videos on.
- Each encoded video is written at once as a piece (prepare_pieces), so a kill loses only the videos being
  encoded; a shard is packed from its pieces once all its videos are done (prepare_shards).
- A rerun encodes what is missing and tries again every video that failed before (a fixed caption or video
  then gets in); a shard holding new samples is rewritten. Its report counts those earlier failures.
- ``dataset.json`` records every setting that shapes a sample (prepare_options): a rerun with other settings
  is refused naming them, unless no sample has been written yet (then the new settings replace the old).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

from tqdm import tqdm

from megatron_qvgen.config.errors import ConfigError
from megatron_qvgen.data.errors import DatasetError
from megatron_qvgen.data.manifest import MANIFEST_NAME, DatasetManifest, read_dataset_manifest, write_dataset_manifest
from megatron_qvgen.data.prepare_options import DTYPES, FAMILIES, PrepareOptions, settings_changes
from megatron_qvgen.data.prepare_pieces import (
    listed_pieces, pending_samples_exist, piece_state, remove_stale_temporaries, write_failure_piece,
    write_sample_piece,
)
from megatron_qvgen.data.prepare_shards import pack_if_ready, packed_shard, shard_blocks
from megatron_qvgen.data.schema import SampleMeta
from megatron_qvgen.data.sources import caption_for, captions_without_video, list_videos, load_caption_table
from megatron_qvgen.data.video_io import VideoError, read_clip

log = logging.getLogger(__name__)
GENERATOR = "megatron_qvgen.data.prepare_latent_shards"

__all__ = ["FAMILIES", "GENERATOR", "PrepareOptions", "PrepareReport", "finish_preparation", "prepare_latent_shards"]


@dataclass
class PrepareReport:
    videos: int = 0                 # in the folder
    assigned: int = 0               # this process's share of them
    already_done: int = 0           # of its share: samples before this run
    encoded: int = 0                # of its share: samples written this run
    retried: int = 0                # of its share: failed in an earlier run, tried again now
    failures: List[Tuple[str, str]] = field(default_factory=list)   # (video, why): this process's share
    packed: Set[int] = field(default_factory=set)                  # shards written by this process
    shards_complete: int = 0        # on disk at the end, all processes: every video a sample or a failure
    shards_total: int = 0
    captions_without_video: List[str] = field(default_factory=list)
    replaced_settings: List[str] = field(default_factory=list)      # accepted: nothing had been encoded with them

    @property
    def shards_packed(self) -> int:
        return len(self.packed)


def prepare_latent_shards(opts: PrepareOptions) -> PrepareReport:
    videos = list_videos(opts.videos_dir)
    table = load_caption_table(opts.captions) if opts.captions else None
    blocks = shard_blocks(videos, opts.samples_per_shard)
    report = PrepareReport(videos=len(videos), shards_total=len(blocks),
                           captions_without_video=captions_without_video(opts.videos_dir, videos, table))
    done, failed_before, any_shard = set(), set(), False
    for j, block in enumerate(blocks):
        shard = packed_shard(opts, j, block)  # refuses a shard made from other videos
        if shard is not None:
            any_shard = True
            done.update(shard.samples)
            failed_before.update(shard.failures)
    settings = opts.settings()
    recorded = _recorded_manifest(opts)
    if recorded is not None:
        report.replaced_settings = _check_settings(opts, recorded, settings, any_shard)
    if os.path.isdir(opts.out_dir):
        remove_stale_temporaries(opts.out_dir)

    todo, pieces = [], listed_pieces(opts.out_dir)
    for i in range(opts.rank, len(videos), opts.world):
        report.assigned += 1
        video = videos[i]
        state = piece_state(opts.out_dir, video, pieces)
        if video in done or state == "sample":
            report.already_done += 1
            continue
        report.retried += state == "failed" or video in failed_before
        todo.append(i)

    manifest = recorded
    if todo or recorded is None or report.replaced_settings:
        vae, encoder = _load_models(opts)
        manifest = _manifest(opts, vae, encoder, settings)
        if recorded is not None and not report.replaced_settings and recorded.identity() != manifest.identity():
            raise DatasetError(f"{os.path.join(opts.out_dir, MANIFEST_NAME)} describes other latents or text "
                               "embeddings than these models make: prepare into a new --out")
        if recorded is None or report.replaced_settings:
            # Every process writes it (the same bytes, atomically) before its first piece: a process started
            # later then finds these settings, never pieces made with settings it has not seen.
            write_dataset_manifest(opts.out_dir, manifest, encoder.encode([""])[0])
        _encode(opts, videos, todo, table, vae, encoder, manifest, blocks, report)
    # Pieces that a killed run left complete but unpacked.
    report.packed |= _pack_ready(opts, blocks, manifest, range(opts.rank, len(blocks), opts.world))
    report.shards_complete = sum(_complete(opts, j, block) for j, block in enumerate(blocks))
    return report


def finish_preparation(opts: PrepareOptions) -> Tuple[Set[int], int]:
    """Once every process has finished: pack any shard left ready, and count the complete ones.

    Returns (shards written now, complete shards).
    """
    blocks = shard_blocks(list_videos(opts.videos_dir), opts.samples_per_shard)
    recorded = _recorded_manifest(opts)
    packed = _pack_ready(opts, blocks, recorded, range(len(blocks))) if recorded is not None else set()
    return packed, sum(_complete(opts, j, block) for j, block in enumerate(blocks))


def _pack_ready(opts: PrepareOptions, blocks, manifest: DatasetManifest, shard_ids) -> Set[int]:
    return {j for j in shard_ids if pack_if_ready(opts, j, blocks[j], manifest)}


def _recorded_manifest(opts: PrepareOptions) -> Optional[DatasetManifest]:
    if not os.path.exists(os.path.join(opts.out_dir, MANIFEST_NAME)):
        return None
    return read_dataset_manifest(opts.out_dir)[0]


def _check_settings(opts: PrepareOptions, recorded: DatasetManifest, settings, any_shard: bool) -> List[str]:
    """The changed settings, accepted only while the folder holds no sample; else DatasetError naming them."""
    path = os.path.join(opts.out_dir, MANIFEST_NAME)
    if recorded.info.get("generator") != GENERATOR:
        raise DatasetError(f"{path} was not written by data/prepare_latents.py: prepare into a new --out")
    changes = settings_changes(recorded.settings, settings)
    if not changes:
        return []
    if any_shard or pending_samples_exist(opts.out_dir):
        if not recorded.settings:
            raise DatasetError(f"{path} was written by an earlier version that did not record its settings, and "
                               "holds samples: prepare into a new --out")
        raise DatasetError(f"{path} holds samples made with other settings: {', '.join(changes)}; rerun with the "
                           "same settings, or prepare into a new --out")
    if opts.rank == 0:
        log.warning("%s: no sample was made with the earlier settings (%s): they are replaced and every video is "
                    "tried again", path, ", ".join(changes))
    return changes


def _load_models(opts: PrepareOptions):
    from megatron_qvgen.data.text_encoders import PretrainedTextEncoder
    from megatron_qvgen.data.video_vae import VideoVAE

    if not opts.progress:  # --no-progress: no weight-loading bars either (logs of long runs stay readable)
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    device = opts.resolved_device()
    vae = VideoVAE(opts.vae_dir, device=device, dtype=DTYPES[opts.vae_dtype], tiling=opts.vae_tiling)
    expected_vae = FAMILIES[opts.family]["vae"]
    if vae.class_name != expected_vae:
        raise DatasetError(f"--family {opts.family} uses {expected_vae}, but {opts.vae_dir} holds {vae.class_name}")
    try:
        vae.check_video_shape(opts.frames, opts.height, opts.width)
    except ConfigError as exc:
        raise ConfigError(f"--frames {opts.frames} --height {opts.height} --width {opts.width}: {exc}") from None
    encoder = PretrainedTextEncoder(opts.text_encoder_dir, opts.tokenizer_dir, opts.text_len,
                                    FAMILIES[opts.family]["padding"], device=device,
                                    dtype=DTYPES[opts.resolved_text_dtype()])
    return vae, encoder


def _manifest(opts: PrepareOptions, vae, encoder, settings) -> DatasetManifest:
    return DatasetManifest(
        latent_channels=vae.latent_channels, text_len=opts.text_len, text_dim=encoder.text_dim, vae=vae.describe(),
        text_encoder=encoder.describe(), latent_norm=vae.norm.to_dict(), settings=settings,
        info={"generator": GENERATOR, "family": opts.family, "frames": opts.frames, "size": [opts.height, opts.width],
              "fps": opts.fps, "vae_dir": os.path.abspath(opts.vae_dir),
              "text_encoder_dir": os.path.abspath(opts.text_encoder_dir)})


def _encode(opts: PrepareOptions, videos, todo, table, vae, encoder, manifest: DatasetManifest, blocks,
            report: PrepareReport) -> None:
    fps = opts.fps or None
    with tqdm(total=len(todo), desc=f"encode videos (rank {opts.rank})", unit="video",
              disable=not opts.progress) as bar:
        upcoming = {videos[i] for i in todo}
        for i in todo:
            video = videos[i]
            upcoming.discard(video)
            try:
                caption = caption_for(opts.videos_dir, video, table)
                clip, clip_fps = read_clip(os.path.join(opts.videos_dir, video), opts.frames, opts.height,
                                           opts.width, fps)
                latent = vae.encode(clip).numpy()
                text = encoder.encode([caption])[0]
                meta = SampleMeta(caption=caption, frames=opts.frames, size=(opts.height, opts.width), fps=clip_fps,
                                  latent_shape=latent.shape, text_shape=text.shape, vae=manifest.vae,
                                  text_encoder=manifest.text_encoder, latent_norm=manifest.latent_norm, source=video)
                write_sample_piece(opts.out_dir, video, latent, text, meta)
                report.encoded += 1
            except ConfigError:
                raise
            except (VideoError, ValueError) as exc:  # ValueError: the writer refuses a non-finite latent
                write_failure_piece(opts.out_dir, video, str(exc))
                report.failures.append((video, str(exc)))
                if opts.progress:  # else the final report lists it
                    tqdm.write(f"skipped video {video}: {exc}")
            bar.update(1)
            j = i // opts.samples_per_shard
            if pack_if_ready(opts, j, blocks[j], manifest, upcoming):
                report.packed.add(j)


def _complete(opts: PrepareOptions, shard: int, block) -> bool:
    try:
        current = packed_shard(opts, shard, block)
    except DatasetError:
        return False
    return current is not None and set(current.samples) | set(current.failures) == set(block)
