"""Moving a teacher through the lent GPU's small-file limit (benchmarks/fidelity/teacher_pack.py), and the
architecture check that lets a diffusers-converted teacher serve a recipe with another text length."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from scripts import load_script



def _tool():
    return load_script("benchmarks/fidelity/teacher_pack.py")


def _folder(path: Path, dtype=torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(0)
    tensors = {"blocks.0.attn1.to_q.weight": (torch.randn(96, 64, generator=g) * 0.02).to(dtype),
               "blocks.0.norm2.bias": torch.randn(64, generator=g).to(dtype),
               "proj_out.weight": (torch.randn(16, 64, generator=g) * 0.1).to(dtype)}
    path.mkdir()
    save_file(tensors, str(path / "diffusion_pytorch_model.safetensors"))
    (path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 1}))
    return tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pack_and_unpack_give_back_the_exact_tensors_and_config(tmp_path, dtype, monkeypatch):
    tool = _tool()
    rename = tool.os.replace

    def same_folder_only(src, dst):   # /tmp is another filesystem on the lent machine: a rename across fails
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise OSError(18, "Invalid cross-device link", str(src))
        rename(src, dst)

    monkeypatch.setattr(tool.os, "replace", same_folder_only)
    tensors = _folder(tmp_path / "teacher", dtype)
    summary = tool.pack(tmp_path / "teacher", tmp_path / "pack", chunk_mib=0.004)   # ~4 KiB: several chunks
    assert summary["chunks"] > 1 and summary["packed_mib"] < summary["raw_mib"]
    back_dir = tmp_path / "fresh" / "back"    # its parent not made yet, as on a fresh lent machine
    tool.unpack(tmp_path / "pack", back_dir)
    back = load_file(str(back_dir / "diffusion_pytorch_model.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert (back_dir / "config.json").read_text() == (tmp_path / "teacher/config.json").read_text()
    assert sorted(p.name for p in back_dir.parent.iterdir()) == ["back"]   # no temporary folder left


def test_a_damaged_or_missing_chunk_is_refused_and_nothing_is_written(tmp_path):
    tool = _tool()
    _folder(tmp_path / "teacher")
    tool.pack(tmp_path / "teacher", tmp_path / "pack", chunk_mib=0.004)
    last = sorted((tmp_path / "pack").glob("teacher_pack.0*"))[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF                                     # a mantissa byte: only the checksum can notice
    last.write_bytes(bytes(data))
    assert tool.main(["unpack", "--src", str(tmp_path / "pack"), "--out", str(tmp_path / "back")]) == 2
    assert not (tmp_path / "back").exists()
    last.unlink()
    with pytest.raises(FileNotFoundError, match=last.name):
        tool.unpack(tmp_path / "pack", tmp_path / "back")
    (tmp_path / "mine").mkdir()                          # an existing folder is never written into
    with pytest.raises(FileExistsError, match="mine"):
        tool.unpack(tmp_path / "pack", tmp_path / "mine")


def test_pack_refuses_above_its_size_limit_without_writing(tmp_path):
    tool = _tool()
    _folder(tmp_path / "teacher")
    with pytest.raises(ValueError, match="max-mib"):
        tool.pack(tmp_path / "teacher", tmp_path / "pack", max_mib=0.001)
    assert not (tmp_path / "pack").exists()


def test_text_len_of_a_wan_model_shapes_no_weight_but_everything_else_does():
    from megatron_qvgen.config.model import CogVideoXConfig, WanConfig, architecture_differences

    recipe = WanConfig(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=1, text_dim=16, text_len=32)
    converted = WanConfig(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=1, text_dim=16)
    assert converted.text_len == 512 and architecture_differences(converted, recipe) == {}
    wider = WanConfig(num_attention_heads=2, attention_head_dim=8, ffn_dim=64, num_layers=1, text_dim=16)
    assert architecture_differences(wider, recipe) == {"ffn_dim": (64, 32)}
    assert architecture_differences(CogVideoXConfig(), recipe) == {"arch": ("cogvideox", "wan")}
