"""Checks the Wan and CogVideoX parity tests share (results of one multi-rank run over several layouts)."""
import torch
from safetensors.torch import load_file


def assert_layout_matches_diffusers(per_rank, layout, rel):
    """Every rank's gradient shards and last-stage predictions within ``rel`` of diffusers at ``layout``."""
    last_stage_outputs = 0
    for result in per_rank:
        got = result[layout]
        assert got["grads_checked"] > 0
        assert got["grad"] <= rel, f"rank gradient differs by {got['grad']:.2e} at {layout}"
        assert got["prediction"] <= rel, f"prediction differs by {got['prediction']:.2e} at {layout}"
        last_stage_outputs += got["outputs"]
    assert last_stage_outputs > 0, "no rank produced predictions"


def assert_replicated_embedders_equal(per_rank, layouts):
    """The embedders replicated on every pipeline stage and chunk start from identical weights."""
    for layout in layouts:
        for tp_rank in {r[layout]["tp_rank"] for r in per_rank}:  # compare the same TP shard
            copies = [c for r in per_rank if r[layout]["tp_rank"] == tp_rank for c in r[layout]["initial_embedders"]]
            assert len(copies) >= 2 and all(torch.equal(copies[0], c) for c in copies), layout


def assert_round_trip_bit_identical(workdir, name, diffusers_cls):
    """diffusers -> megatron -> saved again by a TP=2 x PP=2 model (``<name>_tp2pp2_saved``) -> diffusers."""
    from megatron_qvgen.convert.to_diffusers import megatron_to_diffusers

    back = megatron_to_diffusers(workdir / f"{name}_tp2pp2_saved", workdir / f"{name}_back", progress=False)
    original = load_file(workdir / f"{name}_diffusers" / "diffusion_pytorch_model.safetensors")
    returned = load_file(back.destination / "diffusion_pytorch_model.safetensors")
    assert sorted(original) == sorted(returned)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    reloaded = diffusers_cls.from_pretrained(back.destination)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(t.numel() for t in original.values())
