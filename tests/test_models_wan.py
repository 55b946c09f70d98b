"""Wan 2.1 on megatron-core equals diffusers' WanTransformer3DModel at every parallel layout.

One group of 4 real gloo processes walks through tiny configs (odd head counts, odd pair counts per
head, other patch sizes) and layouts (TP=1, TP=2, PP=2, TP=2 x PP=2, sequence parallelism, activation
recompute, interleaved PP): each layout loads the SAME converted diffusers weights from a torch_dist
checkpoint, runs two micro-batches forward and backward through megatron's 1F1B / interleaved schedule,
reduces the replicated gradients, and compares its prediction and every local gradient shard with the
diffusers model's (fp32, 1e-5 relative). At TP=2 x PP=2 it also saves the sharded model (for the
bit-identical round trip) and runs the QAT spec at W4A4 forward and backward.
"""
import dataclasses
import os
import warnings

import pytest
import torch

from megatron_qvgen.config import ConfigError, ParallelConfig, QuantConfig, WanConfig
from multiproc import run_distributed
from parity_checks import (assert_layout_matches_diffusers, assert_replicated_embedders_equal,
                           assert_round_trip_bit_identical)
from numerics import max_rel_diff

REL = 1e-5
CONFIGS = {
    # TP=2 splits 2 heads of 8 (4 channel pairs per head, 2/1/1 per axis of the 3D RoPE).
    "even": WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                      out_channels=4, text_dim=12, freq_dim=16, ffn_dim=24, num_layers=4, rope_max_seq_len=64),
    # 3 heads (no TP) of 10 channels: 5 pairs per head.
    "odd_heads": WanConfig(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=10, in_channels=4,
                           out_channels=4, text_dim=8, freq_dim=10, ffn_dim=20, num_layers=2, rope_max_seq_len=64),
    # 6 heads of 6 (3 local heads under TP=2), no cross-attention norm, temporal patch 2, other out channels.
    "wide": WanConfig(patch_size=(2, 2, 2), num_attention_heads=6, attention_head_dim=6, in_channels=4,
                      out_channels=3, text_dim=12, freq_dim=16, ffn_dim=20, num_layers=2, cross_attn_norm=False,
                      rope_max_seq_len=64),
}
# (config, TP, PP, virtual chunks, sequence parallel, recompute)
LAYOUTS = [
    ("even", 1, 1, None, False, False), ("even", 2, 1, None, False, False), ("even", 1, 2, None, False, False),
    ("even", 2, 2, None, False, False), ("even", 2, 2, None, True, True), ("even", 1, 2, 2, False, False),
    ("odd_heads", 1, 1, None, False, False), ("odd_heads", 1, 2, None, False, True),
    ("wide", 2, 1, None, True, False), ("wide", 2, 2, None, False, False),
]


def _latent_frames(cfg):
    return 2 * cfg.patch_size[0]


def _microbatches(cfg, seed=11):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for timesteps in ([3.0, 777.5], [999.0, 250.0]):
        out.append({"latents": torch.randn(2, cfg.in_channels, _latent_frames(cfg), 4, 6, generator=gen),
                    "timestep": torch.tensor(timesteps),
                    "text_embeds": torch.randn(2, 5, cfg.text_dim, generator=gen)})
    return out


def _probe(cfg, seed=12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, cfg.out_channels, _latent_frames(cfg), 4, 6, generator=gen)


def _loss(prediction, probe):
    return (prediction.float() * probe).sum()


def _diffusers_model(cfg, seed):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**cfg.diffusers_kwargs())
    with torch.no_grad():  # move norms and tables away from their trivial initial values
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _reference(model, cfg):
    """diffusers' predictions and parameter gradients for the same micro-batches and loss."""
    model.zero_grad()
    probe, batches = _probe(cfg), _microbatches(cfg)
    predictions = []
    for batch in batches:
        pred = model(batch["latents"], batch["timestep"], batch["text_embeds"], return_dict=False)[0]
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
            result["grad"] = max(result["grad"], max_rel_diff(grad, _local_slice(ref_grads[sharded.key], sharded)))
            result["grads_checked"] += 1
    return result


def _parity_worker(rank, world, workdir):
    from megatron.core import parallel_state

    from megatron_qvgen.convert.checkpoint_io import load_model, save_model
    from megatron_qvgen.models import build_model_chunks
    from megatron_qvgen.parallel import initialize_parallel

    warnings.filterwarnings("ignore", category=FutureWarning)
    references = {}
    results = {}
    for name, tp, pp, vp, sp, recompute in LAYOUTS:
        cfg = CONFIGS[name]
        if name not in references:
            references[name] = _reference(_diffusers_model(cfg, seed=len(references)), cfg)
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vp,
                                  sequence_parallel=sp)
        initialize_parallel(parallel, seed=1234)
        chunks = build_model_chunks(cfg, parallel, recompute=recompute)
        initial_embedders = [torch.cat([p.detach().flatten() for p in c.condition_embedder.parameters()])
                             for c in chunks]
        load_model(chunks, os.path.join(workdir, f"{name}_megatron"), cfg)
        key = (name, tp, pp, vp, sp, recompute)
        results[key] = _compare_layout(chunks, cfg, references[name], _probe(cfg))
        results[key]["initial_embedders"] = initial_embedders
        results[key]["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
        if (name, tp, pp, vp, sp, recompute) == ("even", 2, 2, None, False, False):
            save_model(chunks, os.path.join(workdir, "even_tp2pp2_saved"), cfg)
            results["qat"] = _qat_tp2_pp2(cfg, parallel, workdir)
        results[key]["stage"] = parallel_state.get_pipeline_model_parallel_rank()
    from megatron_qvgen.convert.verify import verify_conversion

    report = verify_conversion(os.path.join(workdir, "even_diffusers"), os.path.join(workdir, "even_megatron"),
                               tensor_parallel=2, pipeline_parallel=2, latent_height=2, latent_width=3)
    results["verify"] = None if report is None else dataclasses.asdict(report)
    return results


def _qat_tp2_pp2(cfg, parallel, workdir):
    """The QAT spec at W4A4 builds, takes the bf16 weights, and runs forward + backward at TP=2 x PP=2."""
    from megatron_qvgen.convert.checkpoint_io import load_model
    from megatron_qvgen.models import build_model_chunks, reduce_replicated_grads
    from megatron_qvgen.models.common.schedule import run_pipeline
    from megatron_qvgen.quant import initialize_quantizers, quant_context, quant_linears

    quant = QuantConfig.for_method("qvgen", "w4a4", aux_rank=4)
    chunks = build_model_chunks(cfg, parallel, spec="qat", quant=quant, recompute=True)
    load_model(chunks, os.path.join(workdir, "even_megatron"), cfg, partial=True)
    initialized = initialize_quantizers(chunks)
    probe = _probe(cfg)
    with quant_context(aux_gate=0.5):
        outputs = run_pipeline(chunks, _microbatches(cfg), loss_fn=lambda pred, batch: _loss(pred, probe))
    reduce_replicated_grads(chunks)
    layers = list(quant_linears(chunks))
    return {
        "quantized_linears": initialized,
        "names": sorted(layer.quant_name for layer in layers),
        "outputs": [o for o in outputs],
        "aux_grads_nonzero": all(layer.aux_L.grad is not None and layer.aux_L.grad.abs().sum() > 0 for layer in layers),
        "all_grads_finite": all(p.grad is None or torch.isfinite(p.grad).all() for c in chunks for p in c.parameters()),
    }


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Convert each tiny diffusers model once, then run every layout in one 4-process group."""
    from megatron_qvgen.convert.to_megatron import diffusers_to_megatron

    workdir = tmp_path_factory.mktemp("wan_parity")
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        _diffusers_model(cfg, seed).save_pretrained(workdir / f"{name}_diffusers")
        diffusers_to_megatron(workdir / f"{name}_diffusers", workdir / f"{name}_megatron", arch="wan",
                              tensor_parallel=2 if name != "odd_heads" else 1, pipeline_parallel=2, progress=False)
    return workdir, run_distributed(_parity_worker, 4, str(workdir), timeout=600)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(str(x) for x in l))
def test_forward_and_gradients_equal_diffusers(parity, layout):
    assert_layout_matches_diffusers(parity[1], layout, REL)


def test_replicated_embedders_start_equal_on_every_stage_and_chunk(parity):
    assert_replicated_embedders_equal(parity[1], LAYOUTS)


def test_diffusers_megatron_tp2_pp2_diffusers_is_bit_identical(parity):
    """diffusers -> megatron -> loaded and saved again by a TP=2 x PP=2 model -> diffusers."""
    from diffusers import WanTransformer3DModel

    assert_round_trip_bit_identical(parity[0], "even", WanTransformer3DModel)


def test_qat_spec_w4a4_runs_forward_backward_at_tp2_pp2(parity):
    _, per_rank = parity
    qat = [r["qat"] for r in per_rank]
    # stage 0 holds embedders + blocks 0-1, stage 1 embedders + blocks 2-3 + proj_out: every linear is quantized
    per_stage = {tuple(q["names"]) for q in qat}
    names = sorted({n for names in per_stage for n in names})
    assert "proj_out" in names and "condition_embedder.time_proj" in names and "blocks.3.ffn.net.2" in names
    assert len([n for n in names if n.startswith("blocks.")]) == 10 * CONFIGS["even"].num_layers
    for q in qat:
        assert q["quantized_linears"] == len(q["names"]) and q["aux_grads_nonzero"] and q["all_grads_finite"]
    outputs = [o for q in qat for o in q["outputs"]]
    assert len(outputs) == 2 * 2  # two micro-batches on each of the two last-stage TP ranks
    assert all(torch.isfinite(o).all() for o in outputs)
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)  # TP ranks agree


def test_verify_tool_reports_the_difference_on_one_rank(parity):
    _, per_rank = parity
    reports = [r["verify"] for r in per_rank if r["verify"] is not None]
    assert len(reports) == 1 and reports[0]["max_rel"] <= REL and reports[0]["reference_max"] > 0


def test_sizes_that_do_not_divide_fail_before_allocation():
    from megatron_qvgen.models.common.megatron_config import transformer_config

    cfg = CONFIGS["odd_heads"]
    with pytest.raises(ConfigError, match="num_attention_heads=3 is not divisible"):
        transformer_config(cfg, ParallelConfig(tensor_parallel=2))
    with pytest.raises(ConfigError, match="num_layers=2 is not divisible"):
        transformer_config(cfg, ParallelConfig(pipeline_parallel=4))
    with pytest.raises(ConfigError, match="FFN size 26 is not divisible"):
        transformer_config(WanConfig(num_attention_heads=4, ffn_dim=26, num_layers=2), ParallelConfig(tensor_parallel=4))
    with pytest.raises(ConfigError, match="proj_out"):
        transformer_config(WanConfig(num_attention_heads=4, attention_head_dim=8, ffn_dim=32, in_channels=1,
                                     out_channels=1, patch_size=(1, 1, 1), num_layers=2),
                           ParallelConfig(tensor_parallel=2))
