"""The latent loader: DP/TP split with real megatron groups, exact resume with workers, bad samples counted."""
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from megatron_qvgen.config import DataConfig, ParallelConfig
from megatron_qvgen.data import DatasetError, SyntheticSpec, build_latent_loader, make_synthetic_shards
from megatron_qvgen.data.epoch_plan import EpochPlanner
from megatron_qvgen.data.shard_index import index_path_for, read_shard_index
from megatron_qvgen.data.synthetic_scenes import random_scene, render_scene
from megatron_qvgen.data.synthetic_shards import project_to_latent
from megatron_qvgen.data.text_encoders import HashCaptionEncoder
from multiproc import run_distributed

C, L, D = 4, 8, 16


def _spec(n, per_shard, frames=3, height=8, width=8, seed=0):
    return SyntheticSpec(num_samples=n, samples_per_shard=per_shard, latent_channels=C, frames=frames, height=height,
                         width=width, text_len=L, text_dim=D, seed=seed)


def _two_shape_dataset(root):
    """16 samples of latent (3, 8, 8) and 16 of (2, 8, 12), in shards of 4: two buckets, eight shards."""
    specs = {"a": _spec(16, 4), "b": _spec(16, 4, frames=2, width=12, seed=1)}
    for name, spec in specs.items():
        make_synthetic_shards(os.path.join(root, name), spec, progress=False)
    return os.path.join(root, "{a,b}", "*.tar"), specs


def _expected_sample(spec, i):
    scene = random_scene(np.random.default_rng([spec.seed, i]), spec.max_objects)
    latent = project_to_latent(render_scene(scene, spec.frames, spec.height, spec.width, 4), spec.latent_channels)
    text = HashCaptionEncoder(spec.text_len, spec.text_dim).encode([scene.caption()])[0]
    return latent.astype(np.float16), text.astype(np.float16), scene.caption()


def _read_one_epoch(rank, world, pattern):
    from megatron_qvgen.parallel import initialize_parallel

    info = initialize_parallel(ParallelConfig(tensor_parallel=2))
    cfg = DataConfig(shards=pattern, num_workers=2, caption_dropout=0.0, seed=11)
    loader = build_latent_loader(cfg, micro_batch_size=2, dp_rank=info.dp_rank, dp_size=info.dp_size)
    batches = [next(loader) for _ in range(loader.micro_batches_per_epoch)]
    loader.close()
    return {
        "dp_rank": info.dp_rank, "tp_rank": info.tp_rank, "per_epoch": loader.micro_batches_per_epoch,
        "keys": [b.keys for b in batches], "captions": [b.captions for b in batches],
        "latents": [b.latents for b in batches], "text": [b.text for b in batches],
        "indices": [b.index for b in batches], "bad": loader.bad_samples,
    }


def test_round_trip_two_dp_ranks_two_workers_tp_identical(tmp_path):
    pattern, specs = _two_shape_dataset(str(tmp_path))
    results = run_distributed(_read_one_epoch, 4, pattern)
    by_dp = {}
    for r in results:
        assert r["per_epoch"] == 32 // (2 * 2)
        assert r["indices"] == list(range(r["per_epoch"]))
        assert r["bad"] == {}
        by_dp.setdefault(r["dp_rank"], []).append(r)
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
    # The two TP ranks of one DP group get identical micro-batches.
    for first, second in by_dp.values():
        assert first["tp_rank"] != second["tp_rank"]
        assert first["keys"] == second["keys"] and first["captions"] == second["captions"]
        for a, b in zip(first["latents"] + first["text"], second["latents"] + second["text"]):
            assert torch.equal(a, b)
    # DP ranks read disjoint samples; together every sample exactly once (no resampling).
    keys = {dp: [(k, tuple(lat.shape[1:])) for ks, lat in zip(r[0]["keys"], r[0]["latents"]) for k in ks]
            for dp, r in by_dp.items()}
    assert not set(keys[0]) & set(keys[1])
    everything = keys[0] + keys[1]
    assert len(everything) == len(set(everything)) == 32
    # What was written is what is read (shape buckets never mixed within a batch).
    shapes = {(3, 8, 8): specs["a"], (2, 8, 12): specs["b"]}
    for r in (by_dp[0][0], by_dp[1][0]):
        for ks, captions, latents, text in zip(r["keys"], r["captions"], r["latents"], r["text"]):
            spec = shapes[tuple(latents.shape[2:])]
            for k, caption, lat, txt in zip(ks, captions, latents, text):
                exp_latent, exp_text, exp_caption = _expected_sample(spec, int(k))
                assert caption == exp_caption
                assert torch.equal(lat, torch.from_numpy(exp_latent).float())
                assert torch.equal(txt, torch.from_numpy(exp_text).float())


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same_batches(xs, ys):
    assert [b.index for b in xs] == [b.index for b in ys]
    for a, b in zip(xs, ys):
        assert a.keys == b.keys and a.captions == b.captions and a.epoch == b.epoch
        assert torch.equal(a.caption_dropped, b.caption_dropped)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.text, b.text)


def test_saved_position_restores_exactly_with_workers(tmp_path):
    pattern, _ = _two_shape_dataset(str(tmp_path))
    cfg0 = DataConfig(shards=pattern, num_workers=0, caption_dropout=0.5, seed=3)
    cfg2 = DataConfig(shards=pattern, num_workers=2, caption_dropout=0.5, seed=3)
    reference = build_latent_loader(cfg0, 2, dp_rank=1, dp_size=2)
    per_epoch = reference.micro_batches_per_epoch
    uninterrupted = _take(reference, per_epoch + 5)          # crosses an epoch boundary

    first = build_latent_loader(cfg2, 2, dp_rank=1, dp_size=2)
    _same_batches(_take(first, 5), uninterrupted[:5])        # worker count does not change the stream
    state = json.loads(json.dumps(first.state_dict()))       # JSON-able, as a checkpoint stores it
    first.close()
    assert state["position"] == 5 and state["epoch"] == 0
    resumed = build_latent_loader(cfg2, 2, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    continuation = _take(resumed, per_epoch)
    resumed.close()
    _same_batches(continuation, uninterrupted[5:])
    assert resumed.epoch == 1 and resumed.position == per_epoch + 5

    # Caption dropout really happened, with the empty-prompt embedding and an empty caption.
    dropped = [(b, i) for b in uninterrupted for i in torch.nonzero(b.caption_dropped).flatten().tolist()]
    assert 0 < len(dropped) < 2 * len(uninterrupted)
    empty = reference.empty_prompt_embedding
    for b, i in dropped:
        assert b.captions[i] == "" and torch.equal(b.text[i], empty)
    assert not torch.equal(uninterrupted[0].text[0], uninterrupted[0].text[1])

    # A state from another layout is refused by name, or translated on request.
    other = build_latent_loader(cfg0, 1, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.position == int(5 / per_epoch * other.micro_batches_per_epoch)
    with pytest.raises(ValueError, match="not a data loader state"):
        other.load_state_dict({"position": 3})


def _corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _patch_npy_header(path, offset, old, new):
    with open(path, "r+b") as f:
        f.seek(offset)
        head = f.read(128)
        assert old in head and len(old) == len(new)
        f.seek(offset)
        f.write(head.replace(old, new, 1))


def test_bad_samples_are_skipped_and_counted(tmp_path):
    root = str(tmp_path / "bad")
    make_synthetic_shards(root, _spec(24, 4), progress=False)
    shard = [os.path.join(root, f"synthetic-{i:06d}.tar") for i in range(6)]
    idx = [read_shard_index(s) for s in shard]
    lat = lambda s, k: idx[s].entries[k].members["latent.npy"]  # noqa: E731
    txt = lambda s, k: idx[s].entries[k].members["text.npy"]  # noqa: E731
    _corrupt(shard[0], lat(0, 1)[0], b"GARBAGE!")                                    # corrupt npy
    _patch_npy_header(shard[1], lat(1, 2)[0], b"(4, 3, 8, 8)", b"(4, 6, 4, 8)")     # wrong shape, same size
    _patch_npy_header(shard[2], txt(2, 3)[0], b"'<f2'", b"'<i2'")                    # wrong dtype
    _corrupt(shard[4], sum(txt(4, 0)) - 2, np.array([np.nan], dtype=np.float16).tobytes())  # NaN (last value)
    with open(shard[5], "r+b") as f:                                                  # truncated tar
        f.truncate(lat(5, 2)[0] + 100)
    bad_keys = {idx[0].entries[1].key, idx[1].entries[2].key, idx[2].entries[3].key, idx[4].entries[0].key,
                idx[5].entries[2].key, idx[5].entries[3].key}

    cfg = DataConfig(shards=root, num_workers=2, caption_dropout=0.0, seed=5)
    loader = build_latent_loader(cfg, 4, dp_rank=0, dp_size=1)
    batches = _take(loader, loader.micro_batches_per_epoch)
    loader.close()
    expected = {"corrupt_npy": 1, "wrong_shape": 1, "wrong_dtype": 1, "non_finite": 1, "truncated": 2}
    assert loader.bad_samples == expected
    per_batch = {}
    for b in batches:
        for reason, n in b.bad_samples.items():
            per_batch[reason] = per_batch.get(reason, 0) + n
        assert torch.isfinite(b.latents).all() and torch.isfinite(b.text).all()
    assert per_batch == expected
    seen = {k for b in batches for k in b.keys}
    all_keys = {e.key for i in idx for e in i.entries}
    assert seen == all_keys - bad_keys                   # every good sample still read once this epoch
    assert loader.state_dict()["bad_samples"] == expected


def test_unindexed_foreign_shards_are_scanned_and_checked(tmp_path):
    src = str(tmp_path / "src")
    make_synthetic_shards(src, _spec(4, 4), progress=False)
    root = str(tmp_path / "foreign")
    os.makedirs(root)
    for name in ("dataset.json", "empty_prompt.npy"):
        shutil.copy(os.path.join(src, name), root)
    members = {}
    with tarfile.open(os.path.join(src, "synthetic-000000.tar")) as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()
    keys = sorted({name.split(".")[0] for name in members})

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    path = os.path.join(root, "foreign.tar")
    with tarfile.open(path, "w") as tar:  # written by "another tool": no index beside it
        for ext in ("latent.npy", "text.npy", "json"):
            add(tar, f"{keys[0]}.{ext}", members[f"{keys[0]}.{ext}"])
        for ext in ("latent.npy", "text.npy", "json"):
            add(tar, f"{keys[1]}.{ext}", members[f"{keys[1]}.{ext}"])
        add(tar, f"{keys[1]}.pickle", b"\x80\x04K\x01.")                 # never decoded
        for ext in ("latent.npy", "json"):                                # text missing
            add(tar, f"{keys[2]}.{ext}", members[f"{keys[2]}.{ext}"])
        for ext in ("latent.npy", "text.npy", "json"):
            add(tar, f"{keys[3]}.{ext}", members[f"{keys[3]}.{ext}"])
    with tarfile.open(path) as tar:
        cut = tar.getmember(f"{keys[3]}.text.npy").offset_data + 10
    with open(path, "r+b") as f:                                          # cut inside the last sample
        f.truncate(cut)
    assert not os.path.exists(index_path_for(path))
    loader = build_latent_loader(DataConfig(shards=root, num_workers=0, caption_dropout=0.0), 1, 0, 1)
    assert loader.bad_samples == {"unexpected_member": 1, "missing_member": 1, "truncated": 1}
    assert loader.micro_batches_per_epoch == 1 and next(loader).keys == [keys[0]]
    assert not os.path.exists(index_path_for(path))                       # reading never writes


def test_too_many_bad_in_a_row_stops_naming_the_shard(tmp_path):
    root = str(tmp_path / "broken")
    make_synthetic_shards(root, _spec(8, 4), progress=False)
    for s in range(2):
        path = os.path.join(root, f"synthetic-{s:06d}.tar")
        for entry in read_shard_index(path).entries:
            _corrupt(path, entry.members["latent.npy"][0], b"BROKEN")
    loader = build_latent_loader(DataConfig(shards=root, num_workers=1, max_bad_in_a_row=3), 2, 0, 1)
    with pytest.raises(DatasetError, match=r"3 bad samples in a row, the last in shard .*synthetic-00000[01]\.tar"):
        next(loader)
    loader.close()


def test_dataset_errors_name_the_file(tmp_path):
    root = str(tmp_path / "d")
    make_synthetic_shards(root, _spec(8, 4), progress=False)
    with pytest.raises(DatasetError, match="text embeddings are 16 wide, the model takes 32"):
        build_latent_loader(DataConfig(shards=root), 1, 0, 1, text_dim=32)
    with pytest.raises(DatasetError, match="2 shards with usable samples cannot be split over 4"):
        build_latent_loader(DataConfig(shards=root, split="shards"), 1, 0, 4)
    with pytest.raises(ValueError, match="dp_rank=2"):
        build_latent_loader(DataConfig(shards=root), 1, 2, 2)
    with pytest.raises(DatasetError, match="does not exist"):
        build_latent_loader(DataConfig(shards=str(tmp_path / "nothing")), 1, 0, 1)
    with open(index_path_for(os.path.join(root, "synthetic-000001.tar")), "w") as f:
        f.write("{not json")
    with pytest.raises(DatasetError, match=r"synthetic-000001\.index\.json is unreadable"):
        build_latent_loader(DataConfig(shards=root), 1, 0, 1)
    os.remove(os.path.join(root, "dataset.json"))
    with pytest.raises(DatasetError, match=r"dataset\.json is missing"):
        build_latent_loader(DataConfig(shards=root), 1, 0, 1)


def test_epoch_plan_splits_balances_and_buckets():
    rng = np.random.default_rng(0)
    shard_sizes = [5, 9, 3, 7, 6, 8, 4]                     # uneven shards
    sample_shard = np.repeat(np.arange(len(shard_sizes)), shard_sizes)
    sample_bucket = rng.integers(0, 3, size=len(sample_shard))
    for resample in (False, True):
        plans = [EpochPlanner(sample_shard, sample_bucket, len(shard_sizes), 3, r, 2, seed=9, resample=resample)
                 for r in range(2)]
        steps = {p.micro_batches_per_epoch for p in plans}
        assert steps == {len(sample_shard) // 6}               # same count on every rank
        for epoch in range(3):
            owned = [set(p.rank_samples(epoch).tolist()) for p in plans]
            for p, own in zip(plans, owned):
                plan = p.plan(epoch)
                assert plan.shape == (p.micro_batches_per_epoch, 3)
                assert all(len(set(sample_bucket[row])) == 1 for row in plan)   # one shape per batch
                assert set(plan.ravel().tolist()) <= own
                assert np.array_equal(plan, EpochPlanner(sample_shard, sample_bucket, len(shard_sizes), 3, p.dp_rank,
                                                         2, seed=9, resample=resample).plan(epoch))
            if not resample:
                assert not owned[0] & owned[1]                  # disjoint shards per DP rank
                assert owned[0] | owned[1] == set(range(len(sample_shard)))
        assert not np.array_equal(plans[0].plan(0), plans[0].plan(1))      # reshuffled each epoch
    longer = EpochPlanner(sample_shard, sample_bucket, len(shard_sizes), 3, 0, 2, seed=9, resample=False,
                          samples_per_epoch=200)
    assert longer.plan(0).shape == (200 // 6, 3)               # more than one pass over the rank's shards


def test_global_split_gives_the_same_global_batches_at_any_dp_size(tmp_path):
    """Step k's global batch (samples and caption drops) is the same set at DP=1 x 4 micro-batches, DP=2 x 2
    and DP=4 x 1: losses, and resumes across DP sizes, do not depend on how a batch is split."""
    root = str(tmp_path / "d")
    make_synthetic_shards(root, _spec(24, 4), progress=False)
    cfg = DataConfig(shards=root, num_workers=0, caption_dropout=0.5, seed=9)

    def steps(dp, per_step, count=5):
        loaders = [build_latent_loader(cfg, 1, r, dp, microbatches_per_step=per_step) for r in range(dp)]
        out = []
        for _ in range(count):
            keys, dropped = [], []
            for loader in loaders:  # rank order = position in the global batch
                for _ in range(per_step):
                    b = next(loader)
                    keys += b.keys
                    dropped += b.caption_dropped.tolist()
            out.append((keys, dropped))
        return out

    reference = steps(1, 4)
    assert steps(2, 2) == reference
    assert steps(4, 1) == reference
    assert len({k for keys, _ in reference for k in keys}) == 20  # 5 steps x 4 distinct samples
