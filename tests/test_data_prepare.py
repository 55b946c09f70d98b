"""data/prepare_latents.py: tiny local VAE + text encoder, videos the test writes; latents equal the VAE's own."""
import dataclasses
import os
import re
import runpy
import signal
import sys

import numpy as np
import pytest
import torch

from megatron_qvgen.config import ConfigError, DataConfig
from megatron_qvgen.data import DatasetError, build_latent_loader, read_dataset_manifest
from megatron_qvgen.data.shard_index import read_shard_index
from megatron_qvgen.data.video_io import VideoError, read_clip
from multiproc import run_distributed

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


def _video_folder(path, count, seed, caption=lambda k: "a red ball"):
    """``count`` 7-frame 8 fps clips v<k>.mp4, each with v<k>.txt unless ``caption(k)`` is None."""
    os.makedirs(path)
    rng = np.random.default_rng(seed)
    for k in range(count):
        _write_video(os.path.join(path, f"v{k}.mp4"), rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=8)
        if caption(k) is not None:
            with open(os.path.join(path, f"v{k}.txt"), "w") as f:
                f.write(caption(k))
    return path


def _tiny_models(root, seed=0):
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
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
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def _finished_files(out):
    """Shards, their indexes and the manifest with their modification times (pieces excluded)."""
    return {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if os.path.isfile(os.path.join(out, n))}


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
    stale = os.path.join(out, "shard-000002.tar.tmp-99999")   # left by a run killed long ago
    open(stale, "wb").close()
    os.utime(stale, (0, 0))
    common = ["--videos", str(videos), "--out", out, "--pipeline", models_dir, "--family", "wan", "--frames", "5",
              "--height", "32", "--width", "32", "--fps", "8", "--text-len", "12", "--samples-per-shard", "2",
              "--world", "2", "--no-progress"]
    # Sorted: a_red, b_blue | c_broken, e_nocaption | sub/d_green (shards of 2); split per video: rank 0 encodes
    # a_red, c_broken, d_green, rank 1 b_blue, e_nocaption.
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--rank", "1")
    assert code == 1 and "2 of 5 videos are this process's: 1 encoded now, 0 done before, 1 failed;" in text
    assert "0 shards written, 0/3 complete" in text                    # both its shards wait for rank 0's videos
    assert "failed: e_nocaption.mp4: no caption (no e_nocaption.txt beside it" in text
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--rank", "0")
    assert code == 1 and "3 of 5 videos are this process's: 2 encoded now, 0 done before, 1 failed;" in text
    assert "2 shards written, 2/3 complete" in text and "c_broken.mp4: cannot open as a video" in text
    assert not os.path.exists(stale)
    assert not os.path.exists(os.path.join(out, "shard-000001.tar"))   # all its videos failed: not complete

    # A rerun tries the failed video again and counts it; finished shards stay untouched.
    finished = _finished_files(out)
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--rank", "0")
    assert code == 1 and "0 encoded now, 2 done before, 1 failed (1 had failed before)" in text
    assert finished == _finished_files(out)

    manifest, empty = read_dataset_manifest(out)
    assert (manifest.latent_channels, manifest.text_len, manifest.text_dim) == (4, 12, 16)
    assert manifest.latent_norm == {"kind": "per_channel", "mean": MEAN, "std": STD}
    assert manifest.text_encoder["name"] == "UMT5EncoderModel" and manifest.text_encoder["padding"] == "zeros"
    assert {k: manifest.settings[k] for k in ("frames", "height", "width", "fps", "text_len", "vae_dtype")} == {
        "frames": 5, "height": 32, "width": 32, "fps": 8.0, "text_len": 12, "vae_dtype": "float32"}
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

    # The user fixes a caption, then the broken video: each rerun gets it in and rewrites its shard.
    (videos / "e_nocaption.txt").write_text("a blue ball rolls")
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--rank", "1")
    assert code == 0 and "1 encoded now, 1 done before, 0 failed (1 had failed before); 1 shards written" in text
    assert [f for f, _ in read_shard_index(os.path.join(out, "shard-000001.tar")).failures] == ["c_broken.mp4"]
    _write_video(str(videos / "c_broken.mp4"), rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=8)
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--rank", "0")
    assert code == 0 and "1 encoded now, 2 done before, 0 failed (1 had failed before); 1 shards written, " \
                         "3/3 complete" in text
    index = read_shard_index(os.path.join(out, "shard-000001.tar"))
    assert index.failures == () and [e.key for e in index.entries] == ["000001_0000", "000001_0001"]
    assert not os.listdir(os.path.join(out, "pending"))
    loader = build_latent_loader(DataConfig(shards=out, num_workers=0, caption_dropout=0.0), 1, 0, 1)
    assert loader.micro_batches_per_epoch == 5

    # A changed video list is not silently mixed with finished shards: one line, from rank 0 only.
    _write_video(str(videos / "0_new.mp4"), rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=8)
    (videos / "0_new.txt").write_text("a box")
    code, text, err = _run_cli(monkeypatch, capsys, *common, "--rank", "0")
    assert code == 2 and err.count("\n") == 1
    assert re.match(r"error: .*shard-000000\.tar was made from other videos", err)
    code, text, err2 = _run_cli(monkeypatch, capsys, *common, "--rank", "1")  # a separate process says it too
    assert (code, text, err2) == (2, "", err)


def test_a_run_that_failed_every_video_reruns_with_working_settings(tmp_path, monkeypatch, capsys):
    models_dir = _tiny_models(str(tmp_path / "pipeline"))
    videos = _video_folder(str(tmp_path / "videos"), 3, seed=1)     # 7 frames at 8 fps: under a second
    out = str(tmp_path / "out")
    common = ["--videos", videos, "--out", out, "--pipeline", models_dir, "--height", "32", "--width", "32",
              "--fps", "8", "--text-len", "12", "--no-progress"]
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--frames", "9")    # needs 9 frames: all too short
    assert code == 1 and "3 videos: 0 encoded now, 0 done before, 3 failed; 0 shards written, 0/1 complete" in text
    assert "too short" in text and not [n for n in os.listdir(out) if n.endswith(".tar")]
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--frames", "9", "--allow-failures")
    assert code == 0 and "3 failed (3 had failed before)" in text and "--allow-failures" in text
    # Nothing was encoded with 9 frames, so new settings may replace them: every video is tried again.
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--frames", "5")
    assert code == 0 and "3 videos: 3 encoded now, 0 done before, 0 failed (3 had failed before); 1 shards " \
                         "written, 1/1 complete" in text
    assert read_dataset_manifest(out)[0].settings["frames"] == 5
    assert len(read_shard_index(os.path.join(out, "shard-000000.tar")).entries) == 3
    # Now samples exist: other settings are refused, naming them (one line, from rank 0).
    code, text, err = _run_cli(monkeypatch, capsys, *common, "--frames", "9", "--fps", "16", "--vae-dtype", "bfloat16")
    assert code == 2 and text == "" and err.count("\n") == 1
    assert "holds samples made with other settings: fps 8.0 -> 16.0, frames 5 -> 9, vae_dtype float32 -> bfloat16" \
        in err and "new --out" in err
    # Other model files are other settings too.
    other = _tiny_models(str(tmp_path / "other"), seed=1)
    code, _, err = _run_cli(monkeypatch, capsys, *common, "--frames", "5", "--vae", os.path.join(other, "vae"))
    assert code == 2 and "vae_files (other files)" in err
    code, text, _ = _run_cli(monkeypatch, capsys, *common, "--frames", "5")
    assert code == 0 and "0 encoded now, 3 done before, 0 failed; 0 shards written, 1/1 complete" in text


def _prepare_opts(models_dir, videos, out, **kw):
    from megatron_qvgen.data.prepare import PrepareOptions

    kw = {"frames": 5, "height": 32, "width": 32, "fps": 8, "text_len": 12, "samples_per_shard": 2, **kw}
    return PrepareOptions(videos_dir=videos, out_dir=out, vae_dir=os.path.join(models_dir, "vae"),
                          text_encoder_dir=os.path.join(models_dir, "text_encoder"),
                          tokenizer_dir=os.path.join(models_dir, "tokenizer"), progress=False, **kw)


def _fork(fn):
    """Start ``fn`` in a forked process (exit status 0 if it returns); returns the pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _wait(pid):
    return os.waitpid(pid, 0)[1]


def _shard_bytes(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def test_work_is_split_per_video_and_a_kill_loses_only_the_video_being_encoded(tmp_path):
    from megatron_qvgen.data.prepare import prepare_latent_shards
    from megatron_qvgen.data.video_vae import VideoVAE

    models_dir = _tiny_models(str(tmp_path / "pipeline"))
    colours = ["red", "blue", "green"]
    videos = _video_folder(str(tmp_path / "videos"), 7, seed=2, caption=lambda k: f"a {colours[k % 3]} ball")

    # 4 processes, 7 videos, shards of 2: every process encodes; whoever completes a shard packs it.
    out = str(tmp_path / "by_rank")
    reports = [prepare_latent_shards(_prepare_opts(models_dir, videos, out, rank=r, world=4)) for r in range(4)]
    assert [r.assigned for r in reports] == [2, 2, 2, 1] and [r.encoded for r in reports] == [2, 2, 2, 1]
    assert [r.shards_packed for r in reports] == [0, 2, 1, 1] and reports[-1].shards_complete == 4
    expected = _shard_bytes(out)
    assert len(expected) == 4

    # One process killed (SIGKILL) while encoding its 4th video: the rerun encodes only what was not written.
    killed = str(tmp_path / "killed")

    def encode_then_die():
        original, calls = VideoVAE.encode, []

        def encode(self, video):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, video)

        VideoVAE.encode = encode
        prepare_latent_shards(_prepare_opts(models_dir, videos, killed))

    status = _wait(_fork(encode_then_die))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    report = prepare_latent_shards(_prepare_opts(models_dir, videos, killed))
    assert (report.already_done, report.encoded, report.failures) == (3, 4, [])
    assert _shard_bytes(killed) == expected                  # same bytes whatever the split and the kills

    # Three processes at once into one folder: shards packed as they complete, each once, same bytes.
    together = str(tmp_path / "together")
    pids = [_fork(lambda r=r: prepare_latent_shards(_prepare_opts(models_dir, videos, together, rank=r, world=3)))
            for r in range(3)]
    assert [_wait(pid) for pid in pids] == [0, 0, 0]
    assert _shard_bytes(together) == expected and not os.listdir(os.path.join(together, "pending"))


def _run_as_rank(rank, world, make_opts, allow_failures=False):
    import contextlib
    import io

    from megatron_qvgen.data.prepare_run import run_preparation

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_preparation(make_opts, rank, world, allow_failures)
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def test_processes_launched_together_report_once_and_exit_alike(tmp_path):
    """torchrun's processes (here: a real gloo group) wait for each other, and rank 0 alone reports."""
    models_dir = _tiny_models(str(tmp_path / "pipeline"))
    videos = _video_folder(str(tmp_path / "videos"), 5, seed=4, caption=lambda k: None if k == 3 else "a red ball")
    out = str(tmp_path / "out")

    def options(frames):
        return lambda: _prepare_opts(models_dir, videos, out, frames=frames, rank=int(os.environ["RANK"]), world=2)

    results = run_distributed(_run_as_rank, 2, options(5))
    assert [r["code"] for r in results] == [1, 1] and results[1]["out"] == results[1]["err"] == ""
    assert "5 videos: 4 encoded now, 0 done before, 1 failed; 3 shards written, 3/3 complete" in results[0]["out"]
    assert "failed: v3.mp4: no caption" in results[0]["out"]
    results = run_distributed(_run_as_rank, 2, options(5), allow_failures=True)
    assert [r["code"] for r in results] == [0, 0] and "4 done before, 1 failed (1 had failed before)" in \
        results[0]["out"]
    results = run_distributed(_run_as_rank, 2, options(9))
    assert [r["code"] for r in results] == [2, 2] and results[1]["err"] == "" and results[0]["out"] == ""
    assert results[0]["err"].count("\n") == 1 and "other settings: frames 5 -> 9" in results[0]["err"]


def test_caption_problems_each_have_their_own_message(tmp_path, monkeypatch, capsys):
    from megatron_qvgen.data.sources import caption_for, captions_without_video, list_videos, load_caption_table

    models_dir = _tiny_models(str(tmp_path / "pipeline"))
    videos = tmp_path / "v"
    os.makedirs(videos)
    rng = np.random.default_rng(3)
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        _write_video(str(videos / name), rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), fps=8)
    (videos / "a.txt").write_bytes(b"a caf\xe9 ball")                    # Latin-1, not UTF-8
    (videos / "b.txt").write_text("  \n\t ")
    (videos / "c.txt").write_text("a red box\n")
    (videos / "lost.txt").write_text("a caption whose video is missing")
    names = list_videos(str(videos))
    with pytest.raises(VideoError, match=r"^a\.mp4: caption a\.txt is not UTF-8 text \(byte 0xe9 at position 5\)"):
        caption_for(str(videos), "a.mp4", None)
    with pytest.raises(VideoError, match=r"^b\.mp4: the caption is empty \(b\.txt holds only whitespace\)"):
        caption_for(str(videos), "b.mp4", None)
    assert caption_for(str(videos), "c.mp4", None) == "a red box"
    assert captions_without_video(str(videos), names, None) == ["lost.txt"]
    (tmp_path / "t.csv").write_text("video,caption\nb.mp4,   \nc.mp4,a box\ngone.mp4,a ball\n")
    table = load_caption_table(str(tmp_path / "t.csv"))
    with pytest.raises(VideoError, match=r"b\.mp4: the caption is empty \(its row \(b\.mp4\) in the caption table"):
        caption_for(str(videos), "b.mp4", table)
    with pytest.raises(VideoError, match=r"a\.mp4: no caption \(no row of the caption table names it\)"):
        caption_for(str(videos), "a.mp4", table)
    assert captions_without_video(str(videos), names, table) == ["gone.mp4"]
    (tmp_path / "latin.csv").write_bytes(b"video,caption\nc.mp4,caf\xe9\n")
    with pytest.raises(DatasetError, match=r"table .*latin\.csv is not UTF-8 text \(byte 0xe9 at position 23\)"):
        load_caption_table(str(tmp_path / "latin.csv"))

    out = str(tmp_path / "out")
    code, text, _ = _run_cli(monkeypatch, capsys, "--videos", str(videos), "--out", out, "--pipeline", models_dir,
                             "--frames", "5", "--height", "32", "--width", "32", "--fps", "8", "--text-len", "12",
                             "--no-progress")
    assert code == 1 and "1 captions name no video: lost.txt" in text and "1 encoded now" in text
    assert "failed: a.mp4: caption a.txt is not UTF-8 text" in text and "failed: b.mp4: the caption is empty" in text


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
    models_dir = _tiny_models(str(tmp_path / "pipeline"))
    opts = PrepareOptions(videos_dir=str(tmp_path / "videos"), out_dir=str(tmp_path / "out"),
                          vae_dir=str(tmp_path / "cog_vae"), text_encoder_dir=os.path.join(models_dir, "text_encoder"),
                          tokenizer_dir=os.path.join(models_dir, "tokenizer"), family="wan", frames=5, height=32,
                          width=32, progress=False)
    with pytest.raises(DatasetError, match="--family wan uses AutoencoderKLWan"):
        prepare_latent_shards(opts)
    with pytest.raises(ConfigError, match="--text-encoder folder .*none does not exist"):
        prepare_latent_shards(dataclasses.replace(opts, text_encoder_dir=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="--rank 2 is outside"):
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
    with pytest.raises(VideoError, match="missing.mp4: no caption"):
        caption_for(str(tmp_path / "v"), "missing.mp4", csv_table)
    (tmp_path / "bad.jsonl").write_text('{"video": "b.mp4", "caption": "ok"}\n{"video": "b.mp4"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: needs a video column"):
        load_caption_table(str(tmp_path / "bad.jsonl"))
    (tmp_path / "worse.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"worse\.jsonl:1: not JSON"):
        load_caption_table(str(tmp_path / "worse.jsonl"))
