"""The synthetic moving-shapes set: deterministic, captions true to the pixels, latent-space or through a VAE."""
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from megatron_qvgen.config import ConfigError, DataConfig
from megatron_qvgen.data import (
    DatasetError, SyntheticSpec, build_latent_loader, ensure_synthetic_dataset, make_synthetic_shards,
    read_dataset_manifest,
)
from megatron_qvgen.data.synthetic_scenes import BACKGROUNDS, random_scene, render_scene
from megatron_qvgen.data.synthetic_shards import project_to_latent
from megatron_qvgen.data.text_encoders import HashCaptionEncoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    spec = SyntheticSpec(num_samples=6, samples_per_shard=4, latent_channels=4, frames=3, height=8, width=8,
                         text_len=12, text_dim=16, seed=3)
    make_synthetic_shards(str(tmp_path / "a"), spec, progress=False)
    make_synthetic_shards(str(tmp_path / "b"), spec, progress=False, workers=2)   # forked shard writers
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert sorted(_files(tmp_path / "a")) == ["dataset.json", "empty_prompt.npy", "synthetic-000000.index.json",
                                              "synthetic-000000.tar", "synthetic-000001.index.json",
                                              "synthetic-000001.tar"]
    other = SyntheticSpec(**{**spec.__dict__, "seed": 4})
    make_synthetic_shards(str(tmp_path / "c"), other, progress=False)
    assert _files(tmp_path / "c")["synthetic-000000.tar"] != _files(tmp_path / "a")["synthetic-000000.tar"]
    # Rerunning on a finished folder is a no-op; another spec in the same folder is refused.
    make_synthetic_shards(str(tmp_path / "a"), spec, progress=False)
    with pytest.raises(DatasetError, match="other data than this synthetic spec"):
        make_synthetic_shards(str(tmp_path / "a"), other, progress=False)


def test_captions_describe_the_motion_and_change_the_embedding():
    directions = {"to the left": (0, -1), "to the right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    seen = set()
    for i in range(24):
        scene = random_scene(np.random.default_rng([7, i]), max_objects=1)
        video = render_scene(scene, 5, 24, 32, supersample=2)
        moving = np.abs(video - np.asarray(BACKGROUNDS[scene.background])).sum(-1) > 0.3
        ys, xs = np.mgrid[:24, :32]
        centre = [np.array([(ys * m).sum(), (xs * m).sum()]) / m.sum() for m in (moving[0], moving[-1])]
        step = centre[1] - centre[0]
        phrase = next(p for p in directions if f"moving {scene.objects[0].speed} {p}" in scene.caption())
        expected = np.asarray(directions[phrase])
        assert step @ expected > 1.0, scene.caption()                     # moved pixels the right way
        assert abs(step @ expected[::-1]) < 0.25 * (step @ expected), scene.caption()  # and not sideways
        seen.add(phrase)
    assert seen == set(directions)
    encoder = HashCaptionEncoder(text_len=16, text_dim=32)
    a, b, a2 = encoder.encode(["a small red circle moving up", "a small blue circle moving up",
                               "a small red circle moving up"])
    assert np.array_equal(a, a2) and not np.allclose(a, b)
    assert np.abs(a[6]).sum() > 0 and not a[7:].any()  # six words + end token, then zeros (Wan padding)
    # The latent sees the colour too.
    red = random_scene(np.random.default_rng([1, 0]), max_objects=1)
    blue = type(red)(objects=(type(red.objects[0])(**{**red.objects[0].__dict__, "colour": "blue"}),),
                     background=red.background)
    assert not np.allclose(project_to_latent(render_scene(red, 3, 8, 8), 4),
                           project_to_latent(render_scene(blue, 3, 8, 8), 4))


def _tiny_wan_vae(path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0],
                     latents_std=[1.5, 2.0, 0.5, 1.0]).save_pretrained(path)
    return path


def test_through_a_diffusers_vae_equals_the_vae_output(tmp_path):
    from megatron_qvgen.data.video_vae import VideoVAE

    vae = VideoVAE(_tiny_wan_vae(str(tmp_path / "vae")))
    spec = SyntheticSpec(num_samples=2, samples_per_shard=2, latent_channels=4, frames=2, height=2, width=3,
                         text_len=8, text_dim=16, seed=5)
    make_synthetic_shards(str(tmp_path / "shards"), spec, vae=vae, progress=False)
    manifest, _ = read_dataset_manifest(str(tmp_path / "shards"))
    assert manifest.vae["name"] == "AutoencoderKLWan" and manifest.latent_norm["kind"] == "per_channel"
    loader = build_latent_loader(DataConfig(shards=str(tmp_path / "shards"), num_workers=0, caption_dropout=0.0),
                                 2, 0, 1)
    batch = next(loader)
    for key, latent in zip(batch.keys, batch.latents):
        scene = random_scene(np.random.default_rng([spec.seed, int(key)]), spec.max_objects)
        frames, height, width = vae.pixel_shape(2, 2, 3)
        assert (frames, height, width) == (5, 16, 24)
        pixels = torch.from_numpy(render_scene(scene, frames, height, width, supersample=2)).permute(3, 0, 1, 2) * 2 - 1
        with torch.no_grad():
            raw = vae.model.encode(pixels[None]).latent_dist.mode()[0]
        expected = (raw - torch.tensor([0.1, -0.2, 0.3, 0.0]).view(4, 1, 1, 1)) / torch.tensor(
            [1.5, 2.0, 0.5, 1.0]).view(4, 1, 1, 1)
        assert torch.equal(latent, expected.half().float())


def test_cli_and_ensure_synthetic_dataset(tmp_path, monkeypatch):
    out = str(tmp_path / "cli")
    monkeypatch.setattr(sys, "argv", ["make_synthetic.py", "--out", out, "--samples", "5", "--samples-per-shard", "2",
                                      "--channels", "4", "--frames", "2", "--height", "4", "--width", "4",
                                      "--text-len", "8", "--text-dim", "16", "--no-progress"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(REPO, "data", "make_synthetic.py"), run_name="__main__")
    assert done.value.code == 0
    loader = build_latent_loader(DataConfig(shards=out, num_workers=0), 1, 0, 1, latent_channels=4, text_len=8,
                                 text_dim=16)
    assert loader.micro_batches_per_epoch == 5 and len(loader.dataset.shards) == 3

    cfg = DataConfig(shards=str(tmp_path / "auto"), synthesize_if_missing=True, synthetic_samples=4,
                     synthetic_samples_per_shard=2, synthetic_latent_size=(2, 4, 4))
    assert ensure_synthetic_dataset(cfg, latent_channels=4, text_len=8, text_dim=16) is not None
    before = _files(cfg.shards)
    ensure_synthetic_dataset(cfg, latent_channels=4, text_len=8, text_dim=16)
    assert _files(cfg.shards) == before
    assert ensure_synthetic_dataset(DataConfig(shards=str(tmp_path / "none")), 4, 8, 16) is None
    assert not os.path.exists(tmp_path / "none")
    with pytest.raises(ConfigError, match="data.shards to be a directory"):
        ensure_synthetic_dataset(DataConfig(shards=str(tmp_path / "*.tar"), synthesize_if_missing=True), 4, 8, 16)
