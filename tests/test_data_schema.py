"""The sample schema: written shards read back (by tarfile and by webdataset), no pickle, bad input named."""
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from megatron_qvgen.config import ConfigError, DataConfig, ExperimentConfig, apply_overrides
from megatron_qvgen.data import (
    BadSample, DatasetError, DatasetManifest, LatentNorm, SampleMeta, ShardWriter, decode_sample,
    read_dataset_manifest, write_dataset_manifest,
)
from megatron_qvgen.data.schema import decode_npy, encode_npy
from megatron_qvgen.data.shard_index import index_path_for, load_shard_index, read_shard_index

C, F, H, W, L, D = 4, 2, 3, 5, 6, 8
NORM = LatentNorm("per_channel", mean=(0.1, 0.2, 0.3, 0.4), std=(1.0, 2.0, 3.0, 4.0))
MANIFEST = DatasetManifest(latent_channels=C, text_len=L, text_dim=D, vae={"name": "test-vae"},
                           text_encoder={"name": "test-text"}, latent_norm=NORM.to_dict())


def _meta(caption="a red circle moving up", latent_shape=(C, F, H, W)):
    return SampleMeta(caption=caption, frames=5, size=(24, 40), fps=16.0, latent_shape=latent_shape,
                      text_shape=(L, D), vae=MANIFEST.vae, text_encoder=MANIFEST.text_encoder,
                      latent_norm=MANIFEST.latent_norm, source="clips/a.mp4")


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((C, F, H, W)).astype(np.float16), rng.standard_normal((L, D)).astype(np.float16)


def _write(path, n=3):
    with ShardWriter(path, sources=[f"v{i}" for i in range(n)]) as writer:
        for i in range(n):
            latent, text = _arrays(i)
            writer.add(f"sample_{i:03d}", latent, text, _meta(f"caption {i}"))
    return read_shard_index(path)


def test_written_shard_reads_back_with_tarfile_and_webdataset(tmp_path):
    import webdataset as wds

    path = str(tmp_path / "shard-000000.tar")
    index = _write(path)
    assert [e.key for e in index.entries] == ["sample_000", "sample_001", "sample_002"]
    assert index.sources == ("v0", "v1", "v2") and index.tar_bytes == os.path.getsize(path)
    with tarfile.open(path) as tar:                    # a plain tar of webdataset members, in sample order
        names = tar.getnames()
        assert names[:3] == ["sample_000.latent.npy", "sample_000.text.npy", "sample_000.json"]
        member = tar.getmember("sample_001.latent.npy")
        assert index.entries[1].members["latent.npy"] == (member.offset_data, member.size)
        assert np.array_equal(np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False), _arrays(1)[0])
    # webdataset itself groups the members into the same samples (raw bytes; our decoder, never its own).
    raw = list(wds.WebDataset(path, shardshuffle=False))
    assert [r["__key__"] for r in raw] == ["sample_000", "sample_001", "sample_002"]
    for i, r in enumerate(raw):
        sample = decode_sample(r["__key__"], {t: r[t] for t in ("latent.npy", "text.npy", "json")}, MANIFEST)
        latent, text = _arrays(i)
        assert np.array_equal(sample.latent, latent) and np.array_equal(sample.text, text)
        assert sample.meta == _meta(f"caption {i}")
    # Same samples, same bytes: shards are reproducible.
    again = str(tmp_path / "again.tar")
    _write(again)
    with open(path, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_pickle_and_foreign_members_are_refused_without_decoding():
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadSample, match="pickle") as err:
        decode_npy(buf.getvalue(), "evil.npy")
    assert err.value.reason == "corrupt_npy"
    latent, text = _arrays(0)
    members = {"latent.npy": encode_npy(latent), "text.npy": encode_npy(text), "json": _meta().to_json_bytes()}

    class Boom(bytes):
        def __reduce__(self):  # would run if anything unpickled it
            raise AssertionError("unpickled")

    for ext in ("pyd", "pickle"):
        with pytest.raises(BadSample) as err:
            decode_sample("k", {**members, ext: Boom(pickle.dumps(1))}, MANIFEST)
        assert err.value.reason == "unexpected_member"
    with pytest.raises(BadSample) as err:
        decode_sample("k", {t: members[t] for t in ("latent.npy", "json")}, MANIFEST)
    assert err.value.reason == "missing_member"


@pytest.mark.parametrize("change, reason", [
    (lambda m: {**m, "json": b"\xff\xfe"}, "bad_json"),
    (lambda m: {**m, "json": json.dumps({**json.loads(m["json"]), "schema_version": 2}).encode()}, "bad_json"),
    (lambda m: {**m, "json": json.dumps({k: v for k, v in json.loads(m["json"]).items() if k != "caption"}).encode()},
     "bad_json"),
    (lambda m: {**m, "json": json.dumps({**json.loads(m["json"]), "vae": {"name": "other"}}).encode()}, "wrong_meta"),
    (lambda m: {**m, "latent.npy": m["latent.npy"][:-2]}, "corrupt_npy"),
    (lambda m: {**m, "latent.npy": encode_npy(np.zeros((C, F, H, W + 1), np.float16))}, "wrong_shape"),
    (lambda m: {**m, "text.npy": encode_npy(np.zeros((L + 1, D), np.float16))}, "wrong_shape"),
    (lambda m: {**m, "text.npy": _npy(np.zeros((L, D), np.float32))}, "wrong_dtype"),
    (lambda m: {**m, "text.npy": encode_npy(np.full((L, D), np.inf, np.float16))}, "non_finite"),
])
def test_each_bad_sample_has_its_reason(change, reason):
    latent, text = _arrays(0)
    members = {"latent.npy": encode_npy(latent), "text.npy": encode_npy(text), "json": _meta().to_json_bytes()}
    assert decode_sample("k", members, MANIFEST).meta.caption == _meta().caption
    with pytest.raises(BadSample) as err:
        decode_sample("k", change(members), MANIFEST)
    assert err.value.reason == reason


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_writer_refuses_bad_samples_and_leaves_nothing_on_abort(tmp_path):
    path = str(tmp_path / "s.tar")
    latent, text = _arrays(0)
    with pytest.raises(ValueError, match="not finite"):
        with ShardWriter(path) as writer:
            writer.add("ok", latent, text, _meta())
            writer.add("nan", np.full_like(latent, np.nan), text, _meta())
    with pytest.raises(ValueError, match="must match"), ShardWriter(path) as writer:
        writer.add("a.b", latent, text, _meta())
    with pytest.raises(ValueError, match="disagree with the json"), ShardWriter(path) as writer:
        writer.add("x", latent[:, :1], text, _meta())
    assert os.listdir(tmp_path) == []  # no shard, index or temporary file left behind


def test_stale_or_corrupt_index_and_manifest_are_named(tmp_path):
    path = str(tmp_path / "s.tar")
    _write(path, n=2)
    with open(path, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DatasetError, match="stale"):
        load_shard_index(path)
    os.remove(index_path_for(path))
    assert [e.key for e in load_shard_index(path).entries] == ["sample_000", "sample_001"]  # rescanned

    directory = str(tmp_path / "ds")
    write_dataset_manifest(directory, MANIFEST, np.zeros((L, D), np.float32))
    manifest, empty = read_dataset_manifest(directory)
    assert manifest == MANIFEST and empty.shape == (L, D) and empty.dtype == np.float16
    with open(os.path.join(directory, "empty_prompt.npy"), "wb") as f:
        f.write(encode_npy(np.zeros((L, D + 1), np.float16)))
    with pytest.raises(DatasetError, match=r"empty_prompt\.npy must be finite float16 of shape \(6, 8\)"):
        read_dataset_manifest(directory)
    with open(os.path.join(directory, "dataset.json"), "w") as f:
        f.write('{"format": "qvgen-latent-dataset", "latent_channels": -1}')
    with pytest.raises(DatasetError, match=r"dataset\.json is not a valid dataset manifest"):
        read_dataset_manifest(directory)
    with pytest.raises(ValueError, match="latent_norm has 4 channels"):
        DatasetManifest(latent_channels=3, text_len=L, text_dim=D, vae={"name": "v"}, text_encoder={"name": "t"},
                        latent_norm=NORM.to_dict())


def test_latent_norm_round_trip_and_validation():
    z = torch.randn(2, C, F, H, W)
    for norm in (NORM, LatentNorm("scale", scale=1.15258426), LatentNorm()):
        again = LatentNorm.from_dict(json.loads(json.dumps(norm.to_dict())))
        assert again == norm
        assert torch.allclose(norm.denormalize(norm.normalize(z)), z, atol=1e-6)
    stored = NORM.normalize(z)
    assert torch.allclose(stored[:, 1], (z[:, 1] - 0.2) / 2.0)
    with pytest.raises(ValueError, match="std must be positive"):
        LatentNorm("per_channel", mean=(0.0,), std=(0.0,))
    with pytest.raises(ValueError, match="kind"):
        LatentNorm("log")


def test_data_config_is_validated_by_field():
    for kwargs, field in [({"caption_dropout": 1.0}, "data.caption_dropout"), ({"seed": -1}, "data.seed"),
                          ({"synthetic_latent_size": (3, 0, 4)}, "data.synthetic_latent_size"),
                          ({"max_bad_in_a_row": 0}, "data.max_bad_in_a_row"),
                          ({"prefetch_factor": 0}, "data.prefetch_factor"), ({"shards": ""}, "data.shards")]:
        with pytest.raises(ConfigError, match=field):
            DataConfig(**kwargs)
    cfg = apply_overrides(ExperimentConfig(), [("data.synthetic_latent_size", "2,4,6"), ("data.resample", "true")])
    assert cfg.data.synthetic_latent_size == (2, 4, 6) and cfg.data.resample is True
