"""What a user sees when shards are missing, cut short, or do not fit the model: one line, exact, said once."""
import logging
import os

import pytest

from megatron_qvgen.config import CogVideoXConfig, ConfigError, DataConfig, ParallelConfig, WanConfig
from megatron_qvgen.data import DatasetError, SyntheticSpec, build_latent_loader, make_synthetic_shards
from megatron_qvgen.data.shard_index import read_shard_index
from multiproc import run_distributed

C, L, D = 4, 8, 16


def _shards(root, n=8, per_shard=4):
    make_synthetic_shards(root, SyntheticSpec(num_samples=n, samples_per_shard=per_shard, latent_channels=C,
                                              frames=2, height=8, width=8, text_len=L, text_dim=D), progress=False)
    return root


def _tiny_wan(**kw):
    return WanConfig(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=1, **kw)


def test_missing_shards_are_one_user_error_that_suggests_synthesizing(tmp_path):
    for where, says in ((tmp_path / "nothing", "does not exist"), (tmp_path, "holds no .tar shards")):
        with pytest.raises(DatasetError) as err:
            build_latent_loader(DataConfig(shards=str(where)), 1, 0, 1)
        message = str(err.value)
        assert isinstance(err.value, ConfigError)          # the entry points print these as one line
        assert "\n" not in message and str(where) in message and says in message
        assert "--data.synthesize_if_missing true" in message


def test_shards_that_do_not_fit_the_model_name_the_flags(tmp_path):
    root = _shards(str(tmp_path / "d"))
    fits = _tiny_wan(in_channels=C, out_channels=C, text_dim=D, text_len=L)
    assert build_latent_loader(DataConfig(shards=root, num_workers=0), 1, 0, 1, model=fits).micro_batches_per_epoch
    with pytest.raises(DatasetError) as err:
        build_latent_loader(DataConfig(shards=root), 1, 0, 1, model=_tiny_wan(text_len=L))  # 16 channels, 4096 wide
    message = str(err.value)
    assert "\n" not in message and "dataset.json does not fit the model" in message
    assert "the latents have 4 channels, the model in_channels=16, out_channels=16" in message
    assert "--model.in_channels 4 --model.out_channels 4" in message and "--model.text_dim 16" in message
    assert "--model.text_len" not in message                                   # that one fits
    with pytest.raises(DatasetError, match=r"out_channels=8: set --model.in_channels 4 --model.out_channels 4"):
        build_latent_loader(DataConfig(shards=root), 1, 0, 1,
                            model=_tiny_wan(in_channels=C, out_channels=8, text_dim=D, text_len=L))
    cog = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, num_layers=1, time_embed_dim=8, in_channels=C,
                          out_channels=C, text_embed_dim=32, max_text_seq_length=L + 1)
    with pytest.raises(DatasetError, match=r"set --model.text_embed_dim 16; .* set --model.max_text_seq_length 8$"):
        build_latent_loader(DataConfig(shards=root), 1, 0, 1, model=cog)
    # Without the model config (sizes only), the message names both architectures' flags.
    with pytest.raises(DatasetError, match=r"--model.text_dim 16 \(Wan\) or --model.text_embed_dim 16 \(CogVideoX\)"):
        build_latent_loader(DataConfig(shards=root), 1, 0, 1, latent_channels=C, text_dim=32)


def _read_truncated(rank, world, root, explicit):
    from megatron_qvgen.parallel import initialize_parallel

    info = initialize_parallel(ParallelConfig(tensor_parallel=2))   # both ranks read the same samples
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron_qvgen.data").addHandler(handler)
    logging.getLogger("megatron_qvgen.data").setLevel(logging.INFO)
    cfg = DataConfig(shards=root, num_workers=0, caption_dropout=0.0)
    extra = {"log_bad_samples": info.tp_rank == 0 and info.pp_rank == 0} if explicit else {}
    loader = build_latent_loader(cfg, 1, info.dp_rank, info.dp_size, **extra)
    for _ in range(loader.micro_batches_per_epoch):
        next(loader)
    return {"records": records, "bad": loader.bad_samples}


@pytest.mark.parametrize("explicit", [False, True])
def test_truncated_shard_reports_exact_sizes_once(tmp_path, explicit):
    root = _shards(str(tmp_path / "d"))
    path = os.path.join(root, "synthetic-000001.tar")
    index = read_shard_index(path)
    third, fourth = index.entries[2], index.entries[3]
    latent_offset, latent_size = third.members["latent.npy"]
    cut = latent_offset + 100                                    # inside the third sample's latent
    with open(path, "r+b") as f:
        f.truncate(cut)
    results = run_distributed(_read_truncated, 2, root, explicit)
    assert results[0]["bad"] == results[1]["bad"] and results[0]["bad"]["truncated"] >= 2  # each read counts
    said = [m for r in results for m in r["records"]]
    announced = [m for m in said if m.startswith("shard ")]
    assert announced == [f"shard {path} is truncated: the file has {cut} bytes, its index was written for "
                         f"{index.tar_bytes}; 2 of its 4 samples (from {third.key} on) lie past the end and will be "
                         "skipped as bad samples"]
    skipped = {m for m in said if m.startswith("skipping sample")}
    assert results[1]["records"] == []                           # the second TP rank reads them too, silently
    far_offset, far_size = fourth.members["latent.npy"]
    assert skipped == {
        f"skipping sample {third.key} of {path}: truncated: {path} is {cut} bytes long, {third.key}.latent.npy "
        f"({latent_size} bytes at byte {latent_offset}) needs it to reach byte {latent_offset + latent_size}: the "
        "shard is truncated",
        f"skipping sample {fourth.key} of {path}: truncated: {path} is {cut} bytes long, {fourth.key}.latent.npy "
        f"({far_size} bytes at byte {far_offset}) needs it to reach byte {far_offset + far_size}: the shard is "
        "truncated"}
