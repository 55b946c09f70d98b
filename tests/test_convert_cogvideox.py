"""CogVideoX conversion: CLIs end to end, parameter counts of the real recipes, and clear errors for bad input."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_qvgen.config import CogVideoXConfig
from megatron_qvgen.convert.errors import ConversionError
from multiproc import run_distributed
from scripts import load_script
from test_convert_wan import _param_counts

TINY = CogVideoXConfig(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                       text_embed_dim=12, num_layers=2, sample_width=6, sample_height=4, sample_frames=5,
                       max_text_seq_length=6, use_rotary_positional_embeddings=True)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_cogvideox") / "transformer"
    CogVideoXTransformer3DModel(**TINY.diffusers_kwargs()).save_pretrained(folder)
    return folder


def _cli(name):
    return load_script(f"tools/convert/{name}.py").main


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _convert(src, dst, **kw):
    from megatron_qvgen.convert.to_megatron import diffusers_to_megatron

    return diffusers_to_megatron(src, dst, arch="cogvideox", progress=False, **kw)


def test_clis_round_trip_with_model_cogvideox(tiny_diffusers, tmp_path, capsys):
    """--model cogvideox on a pipeline-style folder, back as sharded safetensors that diffusers loads."""
    from diffusers import CogVideoXTransformer3DModel

    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_diffusers, pipeline / "transformer")
    assert _cli("diffusers_to_megatron")(["--model", "cogvideox", "--src", str(pipeline), "--dst", str(tmp_path / "mg"),
                                          "--tp", "2", "--pp", "2", "--no-progress"]) == 0
    assert _cli("megatron_to_diffusers")(["--src", str(tmp_path / "mg"), "--dst", str(tmp_path / "back"),
                                          "--max-shard-gib", "0.00001", "--no-progress"]) == 0
    index = json.loads((tmp_path / "back" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original = load_file(tiny_diffusers / WEIGHTS)
    returned = {}
    for shard in set(index["weight_map"].values()):
        returned.update(load_file(tmp_path / "back" / shard))
    assert sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], v) for k, v in original.items())
    assert "wrote" in capsys.readouterr().out
    reloaded = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "back")
    assert reloaded.config.use_rotary_positional_embeddings and reloaded.config.patch_size_t is None


def test_parameter_counts_of_real_recipes_equal_diffusers(tiny_diffusers, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    from megatron_qvgen.convert.tables import table_for
    from megatron_qvgen.recipes import get_recipe

    cfgs = {name: get_recipe(name).model for name in ("cogvideox_2b", "cogvideox_5b")}
    _convert(tiny_diffusers, tmp_path / "tiny_mg")
    bad = dataclasses.replace(TINY, time_embed_dim=16)
    ours = run_distributed(_param_counts, 1, cfgs, str(tmp_path / "tiny_mg"), bad)[0]
    table = table_for("cogvideox")
    for name, cfg in cfgs.items():
        with torch.device("meta"):
            reference = CogVideoXTransformer3DModel(**cfg.diffusers_kwargs())
        expected = sum(p.numel() for p in reference.parameters())
        assert ours[name]["params"] == expected == table.parameter_count(cfg), name
        assert ours[name]["keys"] == sorted(reference.state_dict()) == sorted(e.megatron for e in table.entries(cfg))
        assert ours[name]["linears"] == sum(isinstance(m, torch.nn.Linear) for m in reference.modules())
        assert ours[name]["names_are_paths"]
    assert ours["cogvideox_2b"]["linears"] == 245 and ours["cogvideox_5b"]["linears"] == 8 * 42 + 5  # QVGEN.md
    billions = {name: round(ours[name]["params"] / 1e9, 2) for name in cfgs}
    assert billions == {"cogvideox_2b": 1.69, "cogvideox_5b": 5.57}  # QVGEN.md
    assert "different model (time_embed_dim: checkpoint 8, model 16)" in ours["errors"][0]
    assert "shape mismatch" in ours["errors"][1] and "time_embedding.linear_1" in ours["errors"][1]


def test_bad_cogvideox_folders_are_named(tiny_diffusers, tmp_path):
    cfg = json.loads((tiny_diffusers / "config.json").read_text())
    variants = {  # name: (config change, expected message, --tp)
        "i2v": ({"use_learned_positional_embeddings": True, "in_channels": 32},
                "use_learned_positional_embeddings=True", 1),
        "v15": ({"patch_size_t": 2}, "patch_size_t=2: only CogVideoX 1.0", 1),
        "ofs": ({"ofs_embed_dim": 512}, "ofs_embed_dim=512", 1),
        "wan": ({"_class_name": "WanTransformer3DModel"}, "expected 'CogVideoXTransformer3DModel'", 1),
        "reshaped": ({"time_embed_dim": 16},
                     r"time_embedding.linear_1.bias has shape \(8,\), the config needs \(16,\)", 1),
        "head_dim": ({"attention_head_dim": 24}, "attention_head_dim=24 must be a multiple of 16", 1),
        "temb": ({"time_embed_dim": 6}, "cannot run at --tp 4 --pp 1: model.time_embed_dim=6 is not divisible", 4),
    }
    for name, (change, message, tp) in variants.items():
        folder = _copy(tiny_diffusers, tmp_path, name)
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ConversionError, match=message):
            _convert(folder, tmp_path / "out", tensor_parallel=tp)

    missing = _copy(tiny_diffusers, tmp_path, "missing")
    tensors = load_file(missing / WEIGHTS)
    del tensors["transformer_blocks.1.attn1.norm_k.bias"]
    save_file(tensors, missing / WEIGHTS)
    with pytest.raises(ConversionError, match="missing, e.g. transformer_blocks.1.attn1.norm_k.bias"):
        _convert(missing, tmp_path / "out")

    with pytest.raises(ConversionError, match="--tp 3"):
        _convert(tiny_diffusers, tmp_path / "out", tensor_parallel=3)
    assert not (tmp_path / "out").exists()
