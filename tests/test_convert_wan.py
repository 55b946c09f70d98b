"""Conversion tools: CLIs end to end, parameter counts of the real recipes, and clear errors for bad input."""
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_qvgen.config import ParallelConfig, WanConfig
from megatron_qvgen.convert.errors import ConversionError
from megatron_qvgen.dist_ckpt import CheckpointError
from multiproc import run_distributed
from scripts import load_script

TINY = WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                 text_dim=12, freq_dim=16, ffn_dim=24, num_layers=2, rope_max_seq_len=64)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "transformer"
    WanTransformer3DModel(**TINY.diffusers_kwargs()).save_pretrained(folder)
    return folder


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_clis_round_trip_and_verify(tiny_diffusers, tmp_path, capsys):
    """The three CLIs on a pipeline-style folder (transformer/ inside), sharded safetensors on the way back."""
    def cli(name):
        return load_script(f"tools/convert/{name}.py").main

    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_diffusers, pipeline / "transformer")
    assert cli("diffusers_to_megatron")(["--model", "wan", "--src", str(pipeline), "--dst", str(tmp_path / "mg"),
                                        "--tp", "2", "--pp", "2", "--no-progress"]) == 0
    assert cli("megatron_to_diffusers")(["--src", str(tmp_path / "mg"), "--dst", str(tmp_path / "back"),
                                        "--max-shard-gib", "0.00001", "--no-progress"]) == 0
    index = json.loads((tmp_path / "back" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original = load_file(tiny_diffusers / WEIGHTS)
    returned = {}
    for shard in set(index["weight_map"].values()):
        returned.update(load_file(tmp_path / "back" / shard))
    assert sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], v) for k, v in original.items())
    out = capsys.readouterr().out
    assert "wrote" in out and "parameters" in out
    # diffusers loads the sharded folder
    from diffusers import WanTransformer3DModel

    WanTransformer3DModel.from_pretrained(tmp_path / "back")


def _param_counts(rank, world, cfgs, ckpt, bad_cfg):
    from megatron_qvgen.convert.checkpoint_io import load_model
    from megatron_qvgen.models import build_model
    from megatron_qvgen.models.common.linears import NamedColumnParallelLinear, NamedRowParallelLinear
    from megatron_qvgen.parallel import initialize_parallel

    warnings.filterwarnings("ignore", category=FutureWarning)
    initialize_parallel(ParallelConfig(), seed=0)
    out = {}
    for name, cfg in cfgs.items():
        with torch.device("meta"):
            model = build_model(cfg, ParallelConfig(), perform_initialization=False)
        linears = [m for m in model.modules() if isinstance(m, (NamedColumnParallelLinear, NamedRowParallelLinear))]
        names = {m.quant_name for m in linears}
        out[name] = {"params": sum(p.numel() for p in model.parameters()), "linears": len(linears),
                     "names_are_paths": names == {n for n, m in model.named_modules() if m in linears},
                     "keys": sorted(sh.key for sh in model.sharded_state_dict().values())}
    # a checkpoint of another model: clear errors
    model = build_model(bad_cfg, ParallelConfig())
    errors = []
    for model_cfg in (bad_cfg, None):
        try:
            load_model([model], ckpt, model_cfg)
        except CheckpointError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


def test_parameter_counts_of_real_recipes_equal_diffusers(tiny_diffusers, tmp_path):
    from diffusers import WanTransformer3DModel

    from megatron_qvgen.convert.tables import table_for
    from megatron_qvgen.convert.to_megatron import diffusers_to_megatron
    from megatron_qvgen.recipes import get_recipe

    cfgs = {name: get_recipe(name).model for name in ("wan_1_3b", "wan_14b")}
    diffusers_to_megatron(tiny_diffusers, tmp_path / "tiny_mg", progress=False)
    bad = WanConfig(**{**vars(TINY), "ffn_dim": 32, "patch_size": TINY.patch_size})
    ours = run_distributed(_param_counts, 1, cfgs, str(tmp_path / "tiny_mg"), bad)[0]
    table = table_for("wan")
    for name, cfg in cfgs.items():
        with torch.device("meta"):
            reference = WanTransformer3DModel(**cfg.diffusers_kwargs())
        expected = sum(p.numel() for p in reference.parameters())
        assert ours[name]["params"] == expected == table.parameter_count(cfg), name
        assert ours[name]["keys"] == sorted(reference.state_dict()) == sorted(e.megatron for e in table.entries(cfg))
        assert ours[name]["linears"] == sum(isinstance(m, torch.nn.Linear) for m in reference.modules())
        assert ours[name]["names_are_paths"]
    assert ours["wan_1_3b"]["linears"] == 306 and ours["wan_14b"]["linears"] == 406  # QVGEN.md
    assert "different model (ffn_dim: checkpoint 24, model 32)" in ours["errors"][0]
    assert "shape mismatch" in ours["errors"][1] and "blocks.0.ffn.net.0.proj.weight" in ours["errors"][1]


# ------------------------------------------------------------------ bad input
def _convert(src, dst, **kw):
    from megatron_qvgen.convert.to_megatron import diffusers_to_megatron

    return diffusers_to_megatron(src, dst, progress=False, **kw)


def test_bad_diffusers_folders_are_named(tiny_diffusers, tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        _convert(tmp_path, tmp_path / "out")

    wrong_class = _copy(tiny_diffusers, tmp_path, "wrong_class")
    cfg = json.loads((wrong_class / "config.json").read_text())
    (wrong_class / "config.json").write_text(json.dumps({**cfg, "_class_name": "CogVideoXTransformer3DModel"}))
    with pytest.raises(ConversionError, match="CogVideoXTransformer3DModel"):
        _convert(wrong_class, tmp_path / "out")

    i2v = _copy(tiny_diffusers, tmp_path, "i2v")
    (i2v / "config.json").write_text(json.dumps({**cfg, "image_dim": 1280}))
    with pytest.raises(ConversionError, match="image_dim=1280"):
        _convert(i2v, tmp_path / "out")

    reshaped = _copy(tiny_diffusers, tmp_path, "reshaped")
    (reshaped / "config.json").write_text(json.dumps({**cfg, "ffn_dim": 32}))
    with pytest.raises(ConversionError, match=r"ffn.net.0.proj.bias has shape \(24,\), the config needs \(32,\)"):
        _convert(reshaped, tmp_path / "out")

    missing = _copy(tiny_diffusers, tmp_path, "missing")
    tensors = load_file(missing / WEIGHTS)
    del tensors["blocks.1.attn2.norm_k.weight"]
    save_file(tensors, missing / WEIGHTS)
    with pytest.raises(ConversionError, match="missing, e.g. blocks.1.attn2.norm_k.weight"):
        _convert(missing, tmp_path / "out")

    corrupt = _copy(tiny_diffusers, tmp_path, "corrupt")
    data = (corrupt / WEIGHTS).read_bytes()
    (corrupt / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        _convert(corrupt, tmp_path / "out")

    with pytest.raises(ConversionError, match="--tp 3"):
        _convert(tiny_diffusers, tmp_path / "out", tensor_parallel=3)
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_never_touched(tiny_diffusers, tmp_path):
    from megatron_qvgen.convert.to_diffusers import megatron_to_diffusers

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "user_file.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        _convert(tiny_diffusers, keep)
    _convert(tiny_diffusers, tmp_path / "mg")
    with pytest.raises(ConversionError, match="already exists"):
        megatron_to_diffusers(tmp_path / "mg", keep, progress=False)
    assert [p.name for p in keep.iterdir()] == ["user_file.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary folders left behind


def test_bad_megatron_checkpoints_are_named(tiny_diffusers, tmp_path):
    from megatron_qvgen.convert.checkpoint_io import write_streaming
    from megatron_qvgen.convert.tables import table_for
    from megatron_qvgen.convert.to_diffusers import megatron_to_diffusers

    with pytest.raises(ConversionError, match="no such checkpoint folder"):
        megatron_to_diffusers(tmp_path / "nothing", tmp_path / "out", progress=False)
    (tmp_path / "not_ckpt").mkdir()
    with pytest.raises(ConversionError, match="not a megatron dist checkpoint"):
        megatron_to_diffusers(tmp_path / "not_ckpt", tmp_path / "out", progress=False)

    _convert(tiny_diffusers, tmp_path / "mg")
    incomplete = _copy(tmp_path / "mg", tmp_path, "incomplete")
    os.remove(incomplete / "qvgen_complete")
    with pytest.raises(CheckpointError, match="not a complete qvgen checkpoint"):
        megatron_to_diffusers(incomplete, tmp_path / "out", progress=False)

    no_metadata = _copy(tmp_path / "mg", tmp_path, "no_metadata")
    os.remove(no_metadata / ".metadata")
    with pytest.raises(ConversionError, match="cannot read the tensor metadata"):
        megatron_to_diffusers(no_metadata, tmp_path / "out", progress=False)

    entries = [e for e in table_for("wan").entries(TINY) if e.megatron != "proj_out.bias"]
    write_streaming(tmp_path / "partial", [(e.megatron, e.shape, torch.float32, lambda e=e: torch.zeros(e.shape))
                                           for e in entries], TINY, progress=False)
    with pytest.raises(ConversionError, match="missing, e.g. proj_out.bias"):
        megatron_to_diffusers(tmp_path / "partial", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    module = load_script("tools/convert/megatron_to_diffusers.py")
    assert module.main(["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "out")]) == 1
    assert "error:" in capsys.readouterr().err
