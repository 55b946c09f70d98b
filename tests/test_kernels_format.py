"""Export format: round trip, atomic writes, and a clear error for each kind of bad folder."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from qvgen_kernels import codes
from qvgen_kernels.format import (CONFIG_FILE, QUANT_CONFIG_FILE, TENSORS_FILE, ExportFormatError,
                                  QuantizationConfig, QuantizedLinearExport, load_export, write_export)

GROUPS = 5


def _linear(out_f=6, in_f=9, bits=4, bias=True, seed=0, aux_rank=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, codes.qmax(bits) + 1, (out_f, in_f), generator=g).float()
    aux = {}
    if aux_rank:
        aux = dict(aux_left=torch.randn(out_f, aux_rank, generator=g), aux_right=torch.randn(aux_rank, in_f, generator=g))
    return QuantizedLinearExport.from_codes(
        q, torch.rand(out_f, 1, generator=g) + 0.1, torch.randn(out_f, 1, generator=g) + 7.3,
        torch.sigmoid(torch.randn(GROUPS, generator=g)), torch.sigmoid(torch.randn(GROUPS, generator=g)), bits,
        bias=torch.randn(out_f, generator=g) if bias else None, **aux), q


def _config(bits=4):
    return QuantizationConfig(weight_bits=bits, act_bits=bits, act_clip_ratio=0.95, num_timestep_groups=GROUPS)


def _write(dst, bits=4, **kw):
    lin_a, qa = _linear(bits=bits)
    lin_b, _ = _linear(out_f=4, in_f=8, bits=bits, bias=False, seed=1, aux_rank=2)
    others = {"patch_embedding.weight": torch.randn(3, 2, dtype=torch.float32), "step_ids": torch.arange(3)}
    write_export(dst, {"_class_name": "WanTransformer3DModel", "num_layers": 1}, _config(bits),
                 {"blocks.0.attn1.to_q": lin_a, "proj_out": lin_b}, others, **kw)
    return lin_a, qa, others


def test_round_trip_keeps_codes_and_types(tmp_path):
    lin_a, qa, others = _write(tmp_path)
    exp = load_export(tmp_path)
    assert exp.transformer_config["_class_name"] == "WanTransformer3DModel"
    assert exp.quant_config.quantized_modules == ("blocks.0.attn1.to_q", "proj_out")
    assert exp.quant_config.module_shapes["blocks.0.attn1.to_q"] == (6, 9)
    got = exp.linears["blocks.0.attn1.to_q"]
    assert got.weight_codes.dtype == torch.uint8 and got.weight_codes.shape == (6, 5)
    assert torch.equal(codes.unpack_codes(got.weight_codes, 9).float(), qa)
    assert torch.equal(got.weight_scale, lin_a.weight_scale) and got.weight_zero.dtype == torch.float32
    assert got.bias.dtype == torch.bfloat16 and exp.linears["proj_out"].bias is None
    assert exp.linears["proj_out"].aux_left.shape == (4, 2)
    assert exp.tensors["patch_embedding.weight"].dtype == torch.bfloat16
    assert torch.equal(exp.tensors["step_ids"], others["step_ids"])
    qc = json.loads((tmp_path / QUANT_CONFIG_FILE).read_text())
    assert qc["format_version"] == 1 and qc["weight_bits"] == 4 and qc["num_timestep_groups"] == GROUPS
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_refuses_to_overwrite_and_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _write(tmp_path)
    with pytest.raises(FileExistsError, match="already holds an export"):
        _write(tmp_path)
    _write(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_write_keeps_the_previous_export(tmp_path, monkeypatch):
    _write(tmp_path)
    before = (tmp_path / TENSORS_FILE).read_bytes()

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr("qvgen_kernels.format.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, overwrite=True)
    assert (tmp_path / TENSORS_FILE).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([TENSORS_FILE, CONFIG_FILE, QUANT_CONFIG_FILE])
    load_export(tmp_path)


def test_name_collisions_are_refused(tmp_path):
    lin, _ = _linear()
    with pytest.raises(ExportFormatError, match="collides"):
        write_export(tmp_path, {}, _config(), {"a": lin}, {"a.weight_codes": torch.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_3bit_codes_share_the_4bit_container(tmp_path):
    _, qa, _ = _write(tmp_path, bits=3)
    exp = load_export(tmp_path)
    assert torch.equal(codes.unpack_codes(exp.linears["blocks.0.attn1.to_q"].weight_codes, 9).float(), qa)
    # a nibble above 7 in a 3-bit export is corrupt
    flat = load_file(tmp_path / TENSORS_FILE)
    flat["blocks.0.attn1.to_q.weight_codes"][0, 0] = 0xF0
    save_file(flat, tmp_path / TENSORS_FILE)
    with pytest.raises(ExportFormatError, match=r"to_q\.weight_codes: codes above 7"):
        load_export(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: os.remove(d / CONFIG_FILE), "missing config.json"),
    (lambda d: (d / TENSORS_FILE).write_bytes(b"\x00garbage"), "cannot read safetensors"),
    (lambda d: (d / QUANT_CONFIG_FILE).write_text("{not json"), "not valid JSON"),
])
def test_broken_files_are_named(tmp_path, mutate, message):
    _write(tmp_path)
    mutate(tmp_path)
    with pytest.raises(ExportFormatError, match=message):
        load_export(tmp_path)


def _edit_quant_config(d, **changes):
    qc = json.loads((d / QUANT_CONFIG_FILE).read_text())
    qc.update(changes)
    (d / QUANT_CONFIG_FILE).write_text(json.dumps(qc))


def _edit_tensors(d, fn):
    flat = load_file(d / TENSORS_FILE)
    fn(flat)
    save_file(flat, d / TENSORS_FILE)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: _edit_quant_config(d, format_version=99), "format_version 99 is not supported"),
    (lambda d: _edit_quant_config(d, num_timestep_groups=7), r"act_clip_lower: expected torch.float32 \[7\]"),
    (lambda d: _edit_tensors(d, lambda f: f.pop("proj_out.weight_scale")),
     r"'proj_out': tensor\(s\) \['weight_scale'\] missing"),
    (lambda d: _edit_tensors(d, lambda f: f.__setitem__("proj_out.weight_zero", torch.zeros(3))),
     r"proj_out.weight_zero: expected torch.float32 \[4\]"),
    (lambda d: _edit_tensors(d, lambda f: f.__setitem__("proj_out.weight_scale", -torch.ones(4))),
     "proj_out.weight_scale: scales must be finite and positive"),
    (lambda d: _edit_tensors(d, lambda f: f.__setitem__("ghost.weight_codes", torch.zeros(1, 1, dtype=torch.uint8))),
     "modules not listed"),
])
def test_inconsistent_exports_are_named(tmp_path, mutate, message):
    _write(tmp_path)
    mutate(tmp_path)
    with pytest.raises(ExportFormatError, match=message):
        load_export(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_export(tmp_path / "nowhere")


def test_invalid_inputs_to_the_writer():
    with pytest.raises(ExportFormatError, match=r"must be in \[0, 7\]"):
        QuantizedLinearExport.from_codes(torch.full((2, 2), 9.0), torch.ones(2), torch.zeros(2), torch.ones(1),
                                         torch.ones(1), 3)
    with pytest.raises(ExportFormatError, match="must be integers"):
        QuantizedLinearExport.from_codes(torch.full((2, 2), 1.5), torch.ones(2), torch.zeros(2), torch.ones(1),
                                         torch.ones(1), 4)
    with pytest.raises(ExportFormatError, match="weight_bits"):
        QuantizationConfig(weight_bits=8, act_bits=8, act_clip_ratio=0.95, num_timestep_groups=1)
