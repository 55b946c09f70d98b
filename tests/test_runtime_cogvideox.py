"""Runtime CogVideoX 1.0 transformer: same math as diffusers' CogVideoXTransformer3DModel (2B sin-cos and 5B RoPE
styles), loads an export, drives CogVideoXPipeline with each step's timestep group.

Tiny random configs on CPU, torch path of the quantized linears (the Triton path is covered by the kernel tests).
"""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid  # noqa: E402

from qvgen_kernels import codes  # noqa: E402
from qvgen_kernels.cogvideox_model import CogVideoXRuntimeTransformer  # noqa: E402
from qvgen_kernels.context import current_timestep_groups, timestep_groups  # noqa: E402
from qvgen_kernels.format import ExportFormatError  # noqa: E402
from qvgen_kernels.linear import QuantizedLinear  # noqa: E402
from qvgen_kernels.runtime import load_transformer  # noqa: E402
from qvgen_kernels.wan_model import WanRuntimeTransformer  # noqa: E402
from tests.numerics import assert_rel_close  # noqa: E402
from tests.test_runtime_wan import GROUPS, _export_tiny, _FakeQuantLinear  # noqa: E402

# 8 text + 2 x 4 x 4 video tokens at the training size; diffusers' 2B table needs text length == max_text_seq_length
TINY_2B = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
               text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
               max_text_seq_length=8)
TINY_5B = dict(TINY_2B, use_rotary_positional_embeddings=True)
CONFIGS = {"2b": TINY_2B, "5b": TINY_5B, "5b_no_qkv_bias": dict(TINY_5B, attention_bias=False)}


def _diffusers_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)     # non-trivial norm weights and biases
    return model


def _inputs(latent_hw=(8, 8), frames=2, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, frames, 4, *latent_hw, generator=gen),
                encoder_hidden_states=torch.randn(batch, 8, 16, generator=gen),
                timestep=torch.tensor([999.0, 321.5])[:batch])


def _pipeline_rope(cfg, latent_hw, frames):
    """What CogVideoXPipeline._prepare_rotary_positional_embeddings hands the transformer."""
    p = cfg["patch_size"] if "patch_size" in cfg else 2
    grid = (latent_hw[0] // p, latent_hw[1] // p)
    crops = get_resize_crop_region_for_grid(grid, cfg["sample_width"] // p, cfg["sample_height"] // p)
    return get_3d_rotary_pos_embed(embed_dim=cfg["attention_head_dim"], crops_coords=crops, grid_size=grid,
                                   temporal_size=frames)


@pytest.mark.parametrize("style", ["2b", "5b", "5b_no_qkv_bias"])
@pytest.mark.parametrize("latent_hw", [(8, 8), (8, 12)])      # the training grid, and another aspect
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])   # measured on CPU: 0 and 0
def test_unquantized_matches_diffusers(style, latent_hw, dtype, rel):
    cfg = CONFIGS[style]
    ref_model = _diffusers_model(cfg)
    runtime = CogVideoXRuntimeTransformer.from_state_dict(ref_model.config, ref_model.state_dict(), dtype=torch.float32)
    ref_model, runtime = ref_model.to(dtype), runtime.to(dtype)
    inputs = {k: (v.to(dtype) if k != "timestep" else v) for k, v in _inputs(latent_hw).items()}
    rope = _pipeline_rope(cfg, latent_hw, 2) if cfg.get("use_rotary_positional_embeddings") else None
    with torch.no_grad():
        expected = ref_model(**inputs, image_rotary_emb=rope, return_dict=False)[0]
        got = runtime(**inputs, image_rotary_emb=rope, return_dict=False)[0]
        # the 5B runtime called without the pipeline's tables computes the same ones itself
        own = runtime(**inputs, return_dict=False)[0]
    assert got.shape == expected.shape == (2, 2, 4, *latent_hw) and got.dtype == dtype
    assert_rel_close(got, expected, rel=rel, what=f"{style} runtime vs diffusers ({dtype}, {latent_hw})")
    assert torch.equal(own, got)
    assert runtime.dtype == dtype and runtime.config.patch_size == 2


@pytest.mark.parametrize("style, bits", [("2b", 4), ("5b", 3)])
def test_export_matches_fake_quantized_diffusers(tmp_path, style, bits):
    cfg = CONFIGS[style]
    model = _diffusers_model(cfg, seed=bits)
    linears, rest = _export_tiny(model, tmp_path, bits)
    runtime = CogVideoXRuntimeTransformer.from_export(tmp_path).to(torch.float32)
    quantized = [n for n, m in runtime.named_modules() if isinstance(m, QuantizedLinear)]
    assert sorted(quantized) == sorted(linears) and len(quantized) == 2 * 8 + 5

    # reference: diffusers with the fake-quantized linears and the non-quantized tensors as stored (bf16)
    with torch.no_grad():
        for name, t in rest.items():
            model.get_parameter(name).copy_(t.to(torch.bfloat16).float())
    for name, export in linears.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _FakeQuantLinear(model.get_submodule(name), export, bits))
    inputs = _inputs()
    rope = _pipeline_rope(cfg, (8, 8), 2) if style == "5b" else None
    with torch.no_grad():
        got = runtime(**inputs, return_dict=False)[0]
        with timestep_groups(codes.timestep_group(inputs["timestep"], GROUPS)):
            expected = model(**inputs, image_rotary_emb=rope, return_dict=False)[0]
    assert_rel_close(got, expected, rel=1e-5, what=f"{style} W{bits}A{bits} runtime vs fake-quantized diffusers")
    with torch.no_grad():       # each sample's timestep group matters
        other = runtime(**{**inputs, "timestep": torch.tensor([998.0, 322.0])}, return_dict=False)[0]
    assert (other - got).abs().max() > 1e-3


@pytest.mark.parametrize("style, attention", [("2b", "bf16"), ("5b", "bf16"), ("2b", "int8"), ("5b", "int8")])
def test_serves_as_cogvideox_pipeline_transformer(tmp_path, style, attention):
    _export_tiny(_diffusers_model(CONFIGS[style]), tmp_path)
    runtime = CogVideoXRuntimeTransformer.from_export(tmp_path, attention=attention)
    assert runtime.transformer_blocks[1].attn1.attention_mode == attention
    calls = []
    runtime.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    recorded_groups = []
    runtime.transformer_blocks[0].attn1.to_q.register_forward_pre_hook(
        lambda m, args: recorded_groups.append(current_timestep_groups()))
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=runtime, scheduler=scheduler)
    gen = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 8, 16, generator=gen).bfloat16(),
                  negative_prompt_embeds=torch.randn(1, 8, 16, generator=gen).bfloat16())
    out = pipe(**embeds, height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=6.0,
               output_type="latent", generator=gen).frames
    assert out.shape == (1, 2, 4, 8, 8) and torch.isfinite(out.float()).all()
    assert len(calls) == len(recorded_groups) == 3            # one batched (uncond, cond) call a step
    for kwargs, groups in zip(calls, recorded_groups):
        t = kwargs["timestep"]
        assert t.shape == (2,) and torch.equal(groups.cpu(), codes.timestep_group(t.cpu(), GROUPS))
        rope = kwargs["image_rotary_emb"]
        assert (rope is None) == (style == "2b")
        if rope is not None:     # the pipeline's tables are the ones the runtime computes without them
            own = runtime._rotary((2, 4, 4), torch.device("cpu"), None)
            assert torch.equal(rope[0], own[0]) and torch.equal(rope[1], own[1])
    assert len({int(k["timestep"][0]) % GROUPS for k in calls}) > 1   # the steps span several groups


def test_rejects_what_it_does_not_run(tmp_path):
    for key, value in (("patch_size_t", 2), ("ofs_embed_dim", 512), ("use_learned_positional_embeddings", True)):
        with pytest.raises(ValueError, match=f"{key}=.*CogVideoX 1.0 text-to-video only"):
            CogVideoXRuntimeTransformer({**TINY_5B, key: value})
    with pytest.raises(ValueError, match="multiple of 16 for the 3D RoPE"):
        CogVideoXRuntimeTransformer({**TINY_5B, "attention_head_dim": 24})
    model = _diffusers_model(TINY_5B)
    runtime = CogVideoXRuntimeTransformer.from_state_dict(model.config, model.state_dict(), dtype=torch.float32)
    inputs = _inputs()
    for bad, match in (({"timestep": torch.tensor([1.0, 2.0, 3.0])}, "one value per sample"),
                       ({"ofs": torch.tensor([1.0])}, "timestep_cond / ofs"),
                       ({"attention_kwargs": {"scale": 0.5}}, r"attention_kwargs \['scale'\]"),
                       ({"hidden_states": inputs["hidden_states"][:, :, :3]}, r"\(B, F, C=4, H, W\)"),
                       ({"encoder_hidden_states": inputs["encoder_hidden_states"][:1]}, "encoder_hidden_states"),
                       ({"image_rotary_emb": _pipeline_rope(TINY_5B, (8, 12), 2)}, "image_rotary_emb must be")):
        with pytest.raises(ValueError, match=match):
            runtime(**{**inputs, **bad})
    bad = dict(model.state_dict())
    bad.pop("proj_out.bias")
    with pytest.raises(ValueError, match=r"missing \['proj_out.bias'\]"):
        CogVideoXRuntimeTransformer.from_state_dict(model.config, bad)


def test_loader_picks_the_model_family_and_refuses_a_mismatch(tmp_path):
    _export_tiny(_diffusers_model(TINY_2B), tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "CogVideoXTransformer3DModel"}))
    assert isinstance(load_transformer(tmp_path), CogVideoXRuntimeTransformer)
    with pytest.raises(ExportFormatError, match="holds a CogVideoXTransformer3DModel, not a WanTransformer3DModel"):
        WanRuntimeTransformer.from_export(tmp_path)
    config_path.write_text(json.dumps({**config, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ExportFormatError, match="'FluxTransformer2DModel' has no runtime"):
        load_transformer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        load_transformer(tmp_path / "absent")
