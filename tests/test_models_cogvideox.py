"""CogVideoX on megatron-core equals diffusers' CogVideoXTransformer3DModel at every parallel layout.

One group of 4 real gloo processes walks through tiny 2B-style (3D sin-cos) and 5B-style (3D RoPE)
configs, with odd head counts and head sizes, and layouts (TP=1, TP=2, PP=2, TP=2 x PP=2, sequence
parallelism with the text/video boundary inside a rank's slice, activation recompute, interleaved PP):
each layout loads the SAME converted diffusers weights from a torch_dist checkpoint, runs two
micro-batches forward and backward through megatron's schedule, reduces the replicated gradients, and
compares its prediction and every local gradient shard with diffusers' (fp32, 1e-5 relative). At
TP=2 x PP=2 it also saves the sharded model (for the bit-identical round trip), runs the QAT spec at
W4A4 forward and backward, and the conversion verifier runs the RoPE model.
"""
import dataclasses
import os
import warnings

import pytest
import torch

from megatron_qvgen.config import CogVideoXConfig, ConfigError, ParallelConfig, QuantConfig
from multiproc import run_distributed
from parity_checks import (assert_layout_matches_diffusers, assert_replicated_embedders_equal,
                           assert_round_trip_bit_identical)
from numerics import max_rel_diff

REL = 1e-5
LATENT = (2, 4, 6)  # latent frames, height, width: 2 x 2 x 3 = 12 video tokens at patch 2


def _cfg(**fields):
    base = dict(in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=12, sample_frames=5,
                sample_height=LATENT[1], sample_width=LATENT[2], max_text_seq_length=6)
    base.update(fields)
    return CogVideoXConfig(**base)


CONFIGS = {
    # 2B-style: 4 heads of 12 (2 local heads under TP=2), 3D sin-cos positions added to the video tokens.
    "sincos": _cfg(num_attention_heads=4, attention_head_dim=12, num_layers=4),
    # 3 heads (no TP) of 16, no q/k/v or patch bias, positions interpolated from another sample size.
    "odd_heads": _cfg(num_attention_heads=3, attention_head_dim=16, num_layers=2, attention_bias=False,
                      patch_bias=False, sample_height=8, sample_width=8, spatial_interpolation_scale=1.5,
                      temporal_interpolation_scale=0.5, freq_shift=1, flip_sin_to_cos=False),
    # 16 heads of 7 channels (odd head size), other output channels. (Heads of 3 channels match too in
    # float64, to 1e-14, but a LayerNorm over 3 channels amplifies fp32 rounding in the backward beyond 1e-5.)
    "odd_dim": _cfg(num_attention_heads=16, attention_head_dim=7, num_layers=2, out_channels=3),
    # 5B-style: 2 heads of 16 with 3D RoPE on the video tokens (4/6/6 channels per axis).
    "rope": _cfg(num_attention_heads=2, attention_head_dim=16, num_layers=4, use_rotary_positional_embeddings=True),
    # 6 heads of 16 (3 local heads), RoPE, 14 text tokens: under SP at TP=2 the 26 tokens split 13 / 13, so
    # rank 1's slice starts with the last text token; the grid's aspect differs from the sample's (crop).
    "rope_wide": _cfg(num_attention_heads=6, attention_head_dim=16, num_layers=2, use_rotary_positional_embeddings=True,
                      max_text_seq_length=14, sample_height=8, sample_width=8, time_embed_dim=6),
}
# (config, TP, PP, virtual chunks, sequence parallel, recompute)
LAYOUTS = [
    ("sincos", 1, 1, None, False, False), ("sincos", 2, 1, None, False, False), ("sincos", 1, 2, None, False, False),
    ("sincos", 2, 2, None, False, False), ("sincos", 2, 2, None, True, True), ("sincos", 1, 2, 2, False, False),
    ("rope", 1, 1, None, False, False), ("rope", 2, 2, None, False, False), ("rope", 2, 1, None, True, True),
    ("odd_heads", 1, 1, None, False, False), ("odd_heads", 1, 2, None, False, True),
    ("odd_dim", 2, 1, None, True, False), ("odd_dim", 2, 2, None, False, False),
    ("rope_wide", 2, 1, None, True, False), ("rope_wide", 1, 2, None, False, False),
]


def _microbatches(cfg, seed=11):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for timesteps in ([3.0, 777.5], [999.0, 250.0]):
        out.append({"latents": torch.randn(2, LATENT[0], cfg.in_channels, *LATENT[1:], generator=gen),
                    "timestep": torch.tensor(timesteps),
                    "text_embeds": torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=gen)})
    return out


def _probe(cfg, seed=12):
    return torch.randn(2, LATENT[0], cfg.out_channels, *LATENT[1:], generator=torch.Generator().manual_seed(seed))


def _loss(prediction, probe):
    return (prediction.float() * probe).sum()


def _diffusers_model(cfg, seed):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**cfg.diffusers_kwargs())
    with torch.no_grad():  # move norms away from their trivial initial values
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _reference(model, cfg):
    """diffusers' predictions and parameter gradients for the same micro-batches and loss."""
    from megatron_qvgen.convert.diffusers_call import diffusers_forward

    model.zero_grad()
    probe, batches = _probe(cfg), _microbatches(cfg)
    predictions = []
    for batch in batches:
        pred = diffusers_forward(model, "cogvideox", batch["latents"], batch["timestep"], batch["text_embeds"])
        (_loss(pred, probe) / len(batches)).backward()
        predictions.append(pred.detach())
    return predictions, {name: p.grad.clone() for name, p in model.named_parameters()}


def _local_slice(full: torch.Tensor, sharded) -> torch.Tensor:
    index = tuple(slice(o, o + n) for o, n in zip(sharded.global_offset, sharded.local_shape))
    return full[index]


def _compare_layout(chunks, cfg, reference, probe):
    """Max relative differences of this rank's prediction and gradient shards."""
    from megatron_qvgen.models import reduce_replicated_grads
    from megatron_qvgen.models.common.schedule import run_pipeline

    predictions, ref_grads = reference
    outputs = run_pipeline(chunks, _microbatches(cfg), loss_fn=lambda pred, batch: _loss(pred, probe))
    reduce_replicated_grads(chunks)
    result = {"prediction": 0.0, "grad": 0.0, "grads_checked": 0, "outputs": len(outputs)}
    for ours, ref in zip(outputs, predictions):
        result["prediction"] = max(result["prediction"], max_rel_diff(ours, ref))
    for chunk in chunks:
        for sharded in chunk.sharded_state_dict().values():
            grad = sharded.data.grad
            assert grad is not None, f"no gradient for {sharded.key}"
            result["grad"] = max(result["grad"], _grad_difference(grad, sharded, ref_grads))
            result["grads_checked"] += 1
    return result


def _grad_difference(grad, sharded, ref_grads) -> float:
    """max |ours - diffusers| relative to the largest reference gradient of the tensor, except for the
    k LayerNorm's bias: it shifts all keys of a head alike, which softmax ignores, so its gradient is zero
    up to rounding in both models; it is measured against its norm's weight gradient instead."""
    ref = _local_slice(ref_grads[sharded.key], sharded)
    if not sharded.key.endswith("attn1.norm_k.bias"):
        return max_rel_diff(grad, ref)
    scale = ref_grads[sharded.key[: -len("bias")] + "weight"].abs().max()
    return float((grad - ref).abs().max() / scale)


def _parity_worker(rank, world, workdir):
    from megatron.core import parallel_state

    from megatron_qvgen.convert.checkpoint_io import load_model, save_model
    from megatron_qvgen.models import build_model_chunks
    from megatron_qvgen.parallel import initialize_parallel

    warnings.filterwarnings("ignore", category=FutureWarning)
    references, results = {}, {}
    for key in LAYOUTS:
        name, tp, pp, vp, sp, recompute = key
        cfg = CONFIGS[name]
        if name not in references:
            references[name] = _reference(_diffusers_model(cfg, seed=list(CONFIGS).index(name)), cfg)
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vp, sequence_parallel=sp)
        initialize_parallel(parallel, seed=1234)
        chunks = build_model_chunks(cfg, parallel, recompute=recompute)
        initial = [torch.cat([p.detach().flatten() for p in c.time_embedding.parameters()]) for c in chunks]
        load_model(chunks, os.path.join(workdir, f"{name}_megatron"), cfg)
        results[key] = _compare_layout(chunks, cfg, references[name], _probe(cfg))
        results[key].update(initial_embedders=initial, tp_rank=parallel_state.get_tensor_model_parallel_rank())
        if key == ("sincos", 2, 2, None, False, False):
            save_model(chunks, os.path.join(workdir, "sincos_tp2pp2_saved"), cfg)
            results["qat"] = _qat_tp2_pp2(cfg, parallel, workdir)
        if key == ("rope_wide", 2, 1, None, True, False):
            results["sp_error"] = _sp_indivisible_error(chunks[0], cfg)
    from megatron_qvgen.convert.verify import verify_conversion

    report = verify_conversion(os.path.join(workdir, "rope_diffusers"), os.path.join(workdir, "rope_megatron"),
                               tensor_parallel=2, pipeline_parallel=2, latent_height=2, latent_width=3)
    results["verify"] = None if report is None else dataclasses.asdict(report)
    return results


def _sp_indivisible_error(chunk, cfg):
    batch = _microbatches(cfg)[0]
    try:
        chunk(batch["latents"], batch["timestep"], batch["text_embeds"][:, :-1])  # 13 + 12 tokens, TP=2
    except ValueError as exc:
        return str(exc)
    return ""


def _qat_tp2_pp2(cfg, parallel, workdir):
    """The QAT spec at W4A4 builds, takes the bf16 weights, and runs forward + backward at TP=2 x PP=2."""
    from megatron_qvgen.convert.checkpoint_io import load_model
    from megatron_qvgen.models import build_model_chunks, reduce_replicated_grads
    from megatron_qvgen.models.common.schedule import run_pipeline
    from megatron_qvgen.quant import initialize_quantizers, quant_context, quant_linears

    quant = QuantConfig.for_method("qvgen", "w4a4", aux_rank=4)
    chunks = build_model_chunks(cfg, parallel, spec="qat", quant=quant, recompute=True)
    load_model(chunks, os.path.join(workdir, "sincos_megatron"), cfg, partial=True)
    initialized = initialize_quantizers(chunks)
    probe = _probe(cfg)
    with quant_context(aux_gate=0.5):
        outputs = run_pipeline(chunks, _microbatches(cfg), loss_fn=lambda pred, batch: _loss(pred, probe))
    reduce_replicated_grads(chunks)
    layers = list(quant_linears(chunks))
    return {
        "quantized_linears": initialized,
        "names": sorted(layer.quant_name for layer in layers),
        "outputs": outputs,
        "aux_grads_zero": sorted(layer.quant_name for layer in layers
                                 if layer.aux_L.grad is None or layer.aux_L.grad.abs().sum() == 0),
        "all_grads_finite": all(p.grad is None or torch.isfinite(p.grad).all() for c in chunks for p in c.parameters()),
    }


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Convert each tiny diffusers model once, then run every layout in one 4-process group."""
    from megatron_qvgen.convert.to_megatron import diffusers_to_megatron

    workdir = tmp_path_factory.mktemp("cogvideox_parity")
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        _diffusers_model(cfg, seed).save_pretrained(workdir / f"{name}_diffusers")
        diffusers_to_megatron(workdir / f"{name}_diffusers", workdir / f"{name}_megatron", arch="cogvideox",
                              tensor_parallel=1 if name == "odd_heads" else 2, pipeline_parallel=2, progress=False)
    return workdir, run_distributed(_parity_worker, 4, str(workdir), timeout=600)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(str(x) for x in l))
def test_forward_and_gradients_equal_diffusers(parity, layout):
    assert_layout_matches_diffusers(parity[1], layout, REL)


def test_replicated_time_embedding_starts_equal_on_every_stage_and_chunk(parity):
    assert_replicated_embedders_equal(parity[1], LAYOUTS)


def test_diffusers_megatron_tp2_pp2_diffusers_is_bit_identical(parity):
    """diffusers -> megatron -> loaded and saved again by a TP=2 x PP=2 model -> diffusers."""
    from diffusers import CogVideoXTransformer3DModel

    assert_round_trip_bit_identical(parity[0], "sincos", CogVideoXTransformer3DModel)


def test_qat_spec_w4a4_runs_forward_backward_at_tp2_pp2(parity):
    _, per_rank = parity
    qat = [r["qat"] for r in per_rank]
    names = sorted({n for q in qat for n in q["names"]})
    layers = CONFIGS["sincos"].num_layers
    # stage 0: time embedding, text projection, blocks 0-1; stage 1: time embedding, blocks 2-3, head
    assert len(names) == 8 * layers + 5  # QVGEN.md's count for 30 layers: 245
    assert {"patch_embed.text_proj", "time_embedding.linear_1", "time_embedding.linear_2", "norm_out.linear",
            "proj_out", "transformer_blocks.3.norm2.linear", "transformer_blocks.0.ff.net.2"} <= set(names)
    # The last block's text stream leaves the model unused: the text half of its norm2 modulation (the second
    # TP shard of norm2.linear) has no gradient, in diffusers too. Every other auxiliary factor learns.
    zero = {n for q in qat for n in q["aux_grads_zero"]}
    assert zero <= {f"transformer_blocks.{layers - 1}.norm2.linear"}, zero
    for q in qat:
        assert q["quantized_linears"] == len(q["names"]) and q["all_grads_finite"]
    outputs = [o for q in qat for o in q["outputs"]]
    assert len(outputs) == 2 * 2  # two micro-batches on each of the two last-stage TP ranks
    assert all(torch.isfinite(o).all() for o in outputs)
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)  # TP ranks agree


def test_verify_tool_reports_the_difference_on_one_rank(parity):
    _, per_rank = parity
    reports = [r["verify"] for r in per_rank if r["verify"] is not None]
    assert len(reports) == 1 and reports[0]["max_rel"] <= REL and reports[0]["reference_max"] > 0


def test_sequence_parallel_needs_the_joint_sequence_to_divide(parity):
    _, per_rank = parity
    errors = [r["sp_error"] for r in per_rank if "sp_error" in r]
    assert errors and all("25 text + video tokens to divide by TP=2" in e for e in errors)


# ------------------------------------------------------------------ in-process: positions and configs
@pytest.mark.parametrize("grid", [(2, 2, 3), (13, 30, 45), (3, 8, 5)])
def test_sincos_table_equals_diffusers(grid):
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    from megatron_qvgen.models.cogvideox.positions import sincos_table

    cfg = _cfg(num_attention_heads=3, attention_head_dim=16, spatial_interpolation_scale=1.875,
               temporal_interpolation_scale=0.5)
    frames, rows, cols = grid
    ref = get_3d_sincos_pos_embed(cfg.hidden_size, (cols, rows), frames, cfg.spatial_interpolation_scale,
                                  cfg.temporal_interpolation_scale, output_type="pt").flatten(0, 1)
    ours = sincos_table(cfg, grid)
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)


@pytest.mark.parametrize("grid,sample", [((13, 30, 45), (60, 90)), ((2, 2, 3), (4, 6)), ((3, 8, 4), (8, 8)),
                                         ((2, 3, 7), (8, 8))])
def test_rotary_tables_equal_diffusers_pipeline(grid, sample):
    from diffusers import CogVideoXTransformer3DModel

    from megatron_qvgen.convert.diffusers_call import cogvideox_rotary
    from megatron_qvgen.models.cogvideox.positions import rotary_tables

    cfg = _cfg(num_attention_heads=2, attention_head_dim=64, use_rotary_positional_embeddings=True,
               sample_height=sample[0], sample_width=sample[1])
    with torch.device("meta"):
        config = CogVideoXTransformer3DModel(**cfg.diffusers_kwargs()).config
    frames, rows, cols = grid
    ref_cos, ref_sin = cogvideox_rotary(config, (1, frames, cfg.in_channels, 2 * rows, 2 * cols), "cpu")
    cos, sin = rotary_tables(cfg, grid)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_sizes_that_do_not_divide_fail_before_allocation():
    from megatron_qvgen.models.common.megatron_config import transformer_config

    with pytest.raises(ConfigError, match="num_attention_heads=3 is not divisible"):
        transformer_config(CONFIGS["odd_heads"], ParallelConfig(tensor_parallel=2))
    with pytest.raises(ConfigError, match="num_layers=2 is not divisible"):
        transformer_config(CONFIGS["odd_heads"], ParallelConfig(pipeline_parallel=4))
    with pytest.raises(ConfigError, match="time_embed_dim=6 is not divisible"):
        transformer_config(_cfg(num_attention_heads=4, attention_head_dim=16, time_embed_dim=6),
                           ParallelConfig(tensor_parallel=4))
    with pytest.raises(ConfigError, match="proj_out"):
        transformer_config(CONFIGS["odd_dim"], ParallelConfig(tensor_parallel=8))
    with pytest.raises(ConfigError, match="attention_head_dim=24 must be a multiple of 16"):
        _cfg(num_attention_heads=2, attention_head_dim=24, use_rotary_positional_embeddings=True)
    with pytest.raises(ConfigError, match="= 40 must be a multiple of 16"):
        _cfg(num_attention_heads=4, attention_head_dim=10)
    with pytest.raises(ConfigError, match="CogVideoX-5b-I2V"):
        _cfg(num_attention_heads=2, attention_head_dim=16, use_rotary_positional_embeddings=True,
             use_learned_positional_embeddings=True)
