"""data/prepare_latents.py: tiny local VAE + text encoder, videos the test writes; latents equal the VAE's own."""
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from megatron_qvgen.config import DataConfig
from megatron_qvgen.data import DatasetError, build_latent_loader, read_dataset_manifest
from megatron_qvgen.data.shard_index import read_shard_index
from megatron_qvgen.data.video_io import VideoError, read_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 2.0, 0.5, 1.0]
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "green", "ball", "box", "rolls", "falls", "left", "down"]


def _write_video(path, frames, fps, codec="mpeg4", pix_fmt="yuv420p"):
    import av

    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _decoded_frames(path):
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _tiny_models(root):
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=MEAN,
                     latents_std=STD).save_pretrained(os.path.join(root, "vae"))
    UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
                     ).save_pretrained(os.path.join(root, "text_encoder"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(os.path.join(root, "tokenizer"))
    return root


def _run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["prepare_latents.py", *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(REPO, "data", "prepare_latents.py"), run_name="__main__")
    return done.value.code, capsys.readouterr().out


def test_folder_of_videos_to_shards_equal_to_the_vae_output(tmp_path, monkeypatch, capsys):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    models_dir = _tiny_models(str(tmp_path / "pipeline"))
    videos = tmp_path / "videos"
    os.makedirs(videos / "sub")
    rng = np.random.default_rng(0)
    captions = {"a_red.mp4": "a red ball rolls left", "b_blue.mp4": "a blue box falls down",
                "sub/d_green.mp4": "a green ball falls"}
    for name, caption in captions.items():
        _write_video(str(videos / name), rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=8)
        (videos / name).with_suffix(".txt").write_text(caption + "\n")
    (videos / "c_broken.mp4").write_bytes(b"not a video at all" * 64)
    (videos / "c_broken.txt").write_text("a red box")
    _write_video(str(videos / "e_nocaption.mp4"), rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=8)
    out = str(tmp_path / "shards")
    os.makedirs(out)
    stale = os.path.join(out, "shard-000002.tar.tmp-99999")   # left by an interrupted run
    open(stale, "wb").close()
    common = ["--videos", str(videos), "--out", out, "--pipeline", models_dir, "--family", "wan", "--frames", "5",
              "--height", "32", "--width", "32", "--fps", "8", "--text-len", "12", "--samples-per-shard", "2",
              "--world", "2", "--no-progress"]
    # Videos sorted: a_red, b_blue | c_broken, e_nocaption | sub/d_green -> shards 0, 2 on rank 0, shard 1 on rank 1.
    code, text = _run_cli(monkeypatch, capsys, *common, "--rank", "1")
    assert code == 1 and "wrote 1 shards (0 samples)" in text and "2 videos failed" in text
    assert "c_broken.mp4: " in text and "cannot open as a video" in text and "e_nocaption.mp4" in text
    code, text = _run_cli(monkeypatch, capsys, *common, "--rank", "0")
    assert code == 0 and "wrote 2 shards (3 samples)" in text and "0 videos failed" in text
    assert not os.path.exists(stale)
    assert [f for f, _ in read_shard_index(os.path.join(out, "shard-000001.tar")).failures] == [
        "c_broken.mp4", "e_nocaption.mp4"]

    # Resumable: finished shards are skipped untouched.
    mtimes = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    code, text = _run_cli(monkeypatch, capsys, *common, "--rank", "0")
    assert "wrote 0 shards" in text and "skipped 2 complete shards" in text
    assert mtimes == {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}

    manifest, empty = read_dataset_manifest(out)
    assert (manifest.latent_channels, manifest.text_len, manifest.text_dim) == (4, 12, 16)
    assert manifest.latent_norm == {"kind": "per_channel", "mean": MEAN, "std": STD}
    assert manifest.text_encoder["name"] == "UMT5EncoderModel" and manifest.text_encoder["padding"] == "zeros"
    loader = build_latent_loader(DataConfig(shards=out, num_workers=0, caption_dropout=0.0), 1, 0, 1,
                                 latent_channels=4, text_len=12, text_dim=16)
    batches = [next(loader) for _ in range(loader.micro_batches_per_epoch)]
    assert sorted(b.captions[0] for b in batches) == sorted(captions.values())

    # The stored latents are the VAE's own output for those videos, normalized as the manifest says.
    vae = AutoencoderKLWan.from_pretrained(os.path.join(models_dir, "vae")).eval()
    encoder = UMT5EncoderModel.from_pretrained(os.path.join(models_dir, "text_encoder")).eval()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(models_dir, "tokenizer"))
    by_caption = {c: n for n, c in captions.items()}
    for batch in batches:
        name = by_caption[batch.captions[0]]
        frames = torch.from_numpy(_decoded_frames(str(videos / name))[:5]).float()
        pixels = (frames / 127.5 - 1.0).permute(3, 0, 1, 2)[None]
        with torch.no_grad():
            raw = vae.encode(pixels).latent_dist.mode()
            tokens = tokenizer([batch.captions[0]], padding="max_length", max_length=12, truncation=True,
                               return_tensors="pt")
            hidden = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
        expected = (raw[0] - torch.tensor(MEAN).view(4, 1, 1, 1)) / torch.tensor(STD).view(4, 1, 1, 1)
        assert batch.latents.shape == (1, 4, 2, 4, 4)
        assert torch.equal(batch.latents[0], expected.half().float())
        expected_text = hidden[0] * tokens.attention_mask[0, :, None]
        assert torch.equal(batch.text[0], expected_text.half().float())
        assert not batch.text[0, tokens.attention_mask[0].sum():].any()
    assert torch.equal(loader.empty_prompt_embedding[1:], torch.zeros(11, 16))

    # A changed video list is not silently mixed with finished shards.
    _write_video(str(videos / "0_new.mp4"), rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=8)
    with pytest.raises(DatasetError, match=r"shard-000000\.tar was made from other videos"):
        _run_cli(monkeypatch, capsys, *common, "--rank", "0")


def test_clip_sampling_resizing_and_errors(tmp_path):
    # Lossless video: frame k is gray level 10k, 16 fps, 24x40.
    levels = np.stack([np.full((24, 40, 3), 10 * k, np.uint8) for k in range(12)])
    levels[:, :, :4] = 255                                     # a bright left border the centre crop removes
    path = str(tmp_path / "levels.mkv")
    _write_video(path, levels, fps=16, codec="ffv1", pix_fmt="bgr0")
    clip, fps = read_clip(path, num_frames=5, height=12, width=12, fps=8)   # every other frame, 1/2 size, cropped
    assert clip.shape == (3, 5, 12, 12) and fps == 8
    assert torch.allclose((clip[:, :, 2:10, 2:10] + 1) * 127.5,
                          torch.tensor([0.0, 20, 40, 60, 80]).view(1, 5, 1, 1).expand(3, 5, 8, 8), atol=0.01)
    same, fps = read_clip(path, num_frames=3, height=24, width=40, fps=None)  # consecutive frames, untouched size
    assert fps == 16
    assert torch.allclose((same + 1) * 127.5, torch.from_numpy(levels[:3]).permute(3, 0, 1, 2).float(), atol=1e-4)
    with pytest.raises(VideoError, match=r"levels\.mkv: too short \(0\.75 s\), needs 13 frames at 16 fps"):
        read_clip(path, num_frames=13, height=24, width=40, fps=16)
    with pytest.raises(VideoError, match="missing.mp4: cannot open"):
        read_clip(str(tmp_path / "missing.mp4"), 5, 8, 8, 8)


def test_cogvideox_vae_scale_and_family_checks(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    from megatron_qvgen.data.prepare import PrepareOptions, prepare_latent_shards
    from megatron_qvgen.data.video_vae import VideoVAE

    torch.manual_seed(0)
    AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                           norm_num_groups=4).save_pretrained(str(tmp_path / "cog_vae"))
    vae = VideoVAE(str(tmp_path / "cog_vae"))
    assert vae.describe()["name"] == "AutoencoderKLCogVideoX" and vae.latent_shape(9, 32, 48) == (4, 3, 4, 6)
    pixels = torch.rand(3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        raw = vae.model.encode(pixels[None]).latent_dist.mode()[0]
    assert torch.equal(vae.encode(pixels), raw * vae.model.config.scaling_factor)
    with pytest.raises(ValueError, match=r"encodes 1 \+ 4k frames, got 8"):
        vae.encode(pixels[:, :8])
    os.makedirs(tmp_path / "videos")
    _write_video(str(tmp_path / "videos" / "v.mp4"), np.zeros((5, 32, 32, 3), np.uint8), fps=8)
    opts = PrepareOptions(videos_dir=str(tmp_path / "videos"), out_dir=str(tmp_path / "out"),
                          vae_dir=str(tmp_path / "cog_vae"), text_encoder_dir=str(tmp_path / "none"),
                          tokenizer_dir=str(tmp_path / "none"), family="wan", frames=5, height=32, width=32,
                          progress=False)
    with pytest.raises(ValueError, match="family 'wan' uses AutoencoderKLWan"):
        prepare_latent_shards(opts)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        PrepareOptions(videos_dir="v", out_dir="o", vae_dir="a", text_encoder_dir="b", tokenizer_dir="c", rank=2)


@pytest.mark.gpu
def test_prepare_on_gpu_matches_cpu_and_batches_are_pinned(tmp_path):
    from megatron_qvgen.data.prepare import PrepareOptions, prepare_latent_shards

    models_dir = _tiny_models(str(tmp_path / "pipeline"))
    os.makedirs(tmp_path / "videos")
    rng = np.random.default_rng(1)
    for name in ("a.mp4", "b.mp4"):
        _write_video(str(tmp_path / "videos" / name), rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=8)
        (tmp_path / "videos" / name).with_suffix(".txt").write_text("a red ball rolls left")
    outputs = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / device)
        prepare_latent_shards(PrepareOptions(
            videos_dir=str(tmp_path / "videos"), out_dir=out, vae_dir=os.path.join(models_dir, "vae"),
            text_encoder_dir=os.path.join(models_dir, "text_encoder"), tokenizer_dir=os.path.join(models_dir, "tokenizer"),
            frames=5, height=32, width=32, fps=8, text_len=12, device=device, text_dtype="float32", progress=False))
        loader = build_latent_loader(DataConfig(shards=out, num_workers=1, caption_dropout=0.0), 2, 0, 1)
        batch = next(loader)
        loader.close()
        assert batch.latents.is_pinned() and batch.text.is_pinned()
        outputs[device] = batch.to("cuda", non_blocking=True)
    cpu, gpu = outputs["cpu"], outputs["cuda"]
    assert cpu.keys == gpu.keys
    assert torch.allclose(gpu.latents, cpu.latents, rtol=1e-2, atol=1e-2)
    assert torch.allclose(gpu.text, cpu.text, rtol=1e-2, atol=1e-2)


def test_caption_tables_csv_and_jsonl(tmp_path):
    from megatron_qvgen.data.sources import caption_for, list_videos, load_caption_table

    os.makedirs(tmp_path / "v" / "sub")
    for name in ("b.mp4", "sub/a.MOV", "notes.txt"):
        (tmp_path / "v" / name).write_bytes(b"")
    assert list_videos(str(tmp_path / "v")) == ["b.mp4", "sub/a.MOV"]
    (tmp_path / "c.csv").write_text('video,caption\nsub/a.MOV,"a red ball, rolling"\nb.mp4,a box\n')
    (tmp_path / "c.jsonl").write_text('{"path": "a.MOV", "text": "from jsonl"}\n\n')
    csv_table = load_caption_table(str(tmp_path / "c.csv"))
    assert caption_for(str(tmp_path / "v"), "sub/a.MOV", csv_table) == "a red ball, rolling"
    assert caption_for(str(tmp_path / "v"), "sub/a.MOV", load_caption_table(str(tmp_path / "c.jsonl"))) == "from jsonl"
    assert caption_for(str(tmp_path / "v"), "missing.mp4", csv_table) is None
    (tmp_path / "bad.jsonl").write_text('{"video": "b.mp4", "caption": "ok"}\n{"video": "b.mp4"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: needs a video column"):
        load_caption_table(str(tmp_path / "bad.jsonl"))
    (tmp_path / "worse.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"worse\.jsonl:1: not JSON"):
        load_caption_table(str(tmp_path / "worse.jsonl"))
