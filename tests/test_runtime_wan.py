"""Runtime Wan 2.1 transformer: same math as diffusers' WanTransformer3DModel, loads an export, drives WanPipeline.

Tiny random configs on CPU, torch path of the quantized linears (the Triton path is covered by the kernel
tests and, on a GPU, by benchmarks/kernels).
"""
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel  # noqa: E402

from qvgen_kernels import codes  # noqa: E402
from qvgen_kernels.context import current_timestep_groups, timestep_groups  # noqa: E402
from qvgen_kernels.format import QuantizationConfig, QuantizedLinearExport, write_export  # noqa: E402
from qvgen_kernels.linear import QuantizedLinear  # noqa: E402
from qvgen_kernels.wan_model import WanRuntimeTransformer  # noqa: E402
from tests.numerics import assert_rel_close  # noqa: E402

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
GROUPS = 10


def _diffusers_model(seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)     # non-trivial norm weights and biases
    return model


def _inputs(batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 3, 4, 4, generator=gen),
                timestep=torch.tensor([999.0, 321.5])[:batch],
                encoder_hidden_states=torch.randn(batch, 7, 16, generator=gen))


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 2e-5), (torch.bfloat16, 1.5e-2)])
def test_unquantized_matches_diffusers(dtype, rel):
    ref_model = _diffusers_model()
    runtime = WanRuntimeTransformer.from_state_dict(ref_model.config, ref_model.state_dict(), dtype=torch.float32)
    ref_model, runtime = ref_model.to(dtype), runtime.to(dtype)
    inputs = {k: (v.to(dtype) if k != "timestep" else v) for k, v in _inputs().items()}
    with torch.no_grad():
        expected = ref_model(**inputs, return_dict=False)[0]
        got = runtime(**inputs, return_dict=False)[0]
    assert got.shape == expected.shape == (2, 4, 3, 4, 4) and got.dtype == dtype
    assert_rel_close(got, expected, rel=rel, what=f"runtime vs diffusers ({dtype})")
    assert runtime.dtype == dtype and runtime.config.patch_size == (1, 2, 2)


class _FakeQuantLinear(torch.nn.Module):
    """The QAT forward at r = 0 with codes.py: per-token Qa with each sample's group, LSQ+ Qw, float64 matmul."""

    def __init__(self, linear: torch.nn.Linear, export: QuantizedLinearExport, bits: int):
        super().__init__()
        q = codes.unpack_codes(export.weight_codes, export.in_features).float()
        self.w_hat = codes.weight_dequant(q, export.weight_scale[:, None], export.weight_zero[:, None]).double()
        # a parameter, so diffusers' time embedder finds its dtype (float32)
        self.bias = torch.nn.Parameter(export.bias.float(), requires_grad=False)
        self.export, self.bits = export, bits

    def forward(self, x):
        groups = current_timestep_groups()
        shape = (-1,) + (1,) * (x.dim() - 1)
        a_lo = self.export.act_clip_lower[groups].reshape(shape)
        a_hi = self.export.act_clip_upper[groups].reshape(shape)
        lo, hi = codes.act_clip_range(x.float(), 0.95, a_lo, a_hi)
        s, z = codes.act_qparams(lo, hi, self.bits)
        x_hat = codes.act_dequant(codes.act_codes(x.float(), s, z, self.bits), s, z)
        return F.linear(x_hat.double(), self.w_hat, self.bias.double()).to(x.dtype)


def _export_tiny(model, folder, bits=4, seed=3):
    """Quantize every linear (min/max LSQ+ init, random clip factors), everything else as the export stores it."""
    gen = torch.Generator().manual_seed(seed)
    linears = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach()
            scale, zero = codes.weight_qparams_from_range(w.amin(1, keepdim=True), w.amax(1, keepdim=True), bits)
            zero = zero + torch.rand(zero.shape, generator=gen) - 0.5
            linears[name] = QuantizedLinearExport.from_codes(
                codes.weight_codes(w, scale, zero, bits), scale, zero,
                torch.sigmoid(torch.randn(GROUPS, generator=gen) + 2), torch.sigmoid(torch.randn(GROUPS, generator=gen) + 2),
                bits, bias=mod.bias.detach())
    rest = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in linears}
    quant = QuantizationConfig(weight_bits=bits, act_bits=bits, act_clip_ratio=0.95, num_timestep_groups=GROUPS)
    write_export(folder, dict(model.config), quant, linears, rest)
    return linears, rest


@pytest.mark.parametrize("bits", [4, 3])
def test_export_matches_fake_quantized_diffusers(tmp_path, bits):
    model = _diffusers_model(seed=bits)
    linears, rest = _export_tiny(model, tmp_path, bits)
    runtime = WanRuntimeTransformer.from_export(tmp_path).to(torch.float32)
    quantized = [n for n, m in runtime.named_modules() if isinstance(m, QuantizedLinear)]
    assert sorted(quantized) == sorted(linears) and len(quantized) == 2 * 10 + 6
    assert runtime.blocks[0].attn1.to_q.weight_scale.dtype == torch.float32     # .to() never casts the codes' scales
    assert {m.gemm_variant for m in runtime.modules() if isinstance(m, QuantizedLinear)} == {None}
    runtime.set_gemm("gluon")
    assert {m.gemm_variant for m in runtime.modules() if isinstance(m, QuantizedLinear)} == {"gluon"}
    with pytest.raises(ValueError, match="GEMM variant must be None or one of"):
        runtime.set_gemm("cutlass")
    runtime.set_gemm(None)        # the torch backend here never reads it; the Triton one: test_runtime_linear.py

    # reference: diffusers with the fake-quantized linears and the non-quantized tensors as stored (bf16)
    with torch.no_grad():
        for name, t in rest.items():
            model.get_parameter(name).copy_(t.to(torch.bfloat16).float())
    for name, export in linears.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _FakeQuantLinear(model.get_submodule(name), export, bits))
    inputs = _inputs()
    with torch.no_grad():
        got = runtime(**inputs, return_dict=False)[0]
        with timestep_groups(codes.timestep_group(inputs["timestep"], GROUPS)):
            expected = model(**inputs, return_dict=False)[0]
    assert_rel_close(got, expected, rel=1e-5, what=f"W{bits}A{bits} runtime vs fake-quantized diffusers")
    # each sample's group matters: the same batch at other timesteps gives another output
    with torch.no_grad():
        other = runtime(**{**inputs, "timestep": torch.tensor([998.0, 322.0])}, return_dict=False)[0]
    assert (other - got).abs().max() > 1e-3


def _sample(runtime, steps=3, seed=0):
    """WanPipeline with the runtime as its transformer, classifier-free guidance, latents out."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=runtime,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt_embeds=torch.randn(1, 7, 16, generator=gen),
                negative_prompt_embeds=torch.randn(1, 7, 16, generator=gen), height=32, width=32, num_frames=5,
                num_inference_steps=steps, guidance_scale=5.0, output_type="latent", generator=gen).frames


@pytest.mark.parametrize("attention", ["bf16", "int8"])
def test_serves_as_wan_pipeline_transformer(tmp_path, attention):
    _export_tiny(_diffusers_model(), tmp_path)
    runtime = WanRuntimeTransformer.from_export(tmp_path, attention=attention)
    assert runtime.blocks[1].attn1.attention_mode == attention
    assert runtime.blocks[1].attn2.attention_mode == "bf16"          # cross-attention: SDPA either way
    seen = []
    runtime.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
    recorded_groups = []
    for block in runtime.blocks[:1]:
        block.attn1.to_q.register_forward_pre_hook(lambda m, args: recorded_groups.append(current_timestep_groups()))
    out = _sample(runtime)
    assert out.shape == (1, 4, 2, 4, 4) and torch.isfinite(out.float()).all()
    assert len(seen) == 6                                       # 3 steps x (cond, uncond)
    for t, groups in zip(seen, recorded_groups):
        assert torch.equal(groups.cpu(), codes.timestep_group(t.cpu(), GROUPS))


def test_int8_attention_keeps_the_cross_attention_in_bf16(monkeypatch):
    """Under attention="int8" only the self-attention is quantized: the queries' attention to the 7 text keys runs
    SDPA (``attention.cross_attention_mode``), unless ``cross_attention`` asks for int8 too."""
    from qvgen_kernels import wan_model
    model = _diffusers_model()
    runtime = WanRuntimeTransformer.from_state_dict(model.config, model.state_dict(), dtype=torch.float32)
    calls = []
    real = wan_model.attention
    monkeypatch.setattr(wan_model, "attention", lambda q, k, v, mode: calls.append((k.shape[1], mode)) or
                        real(q, k, v, mode))
    outputs = {}
    for key, args, (self_mode, cross_mode) in (("int8", ("int8",), ("int8", "bf16")),
                                                ("both", ("int8", "int8"), ("int8", "int8")),
                                                ("bf16", ("bf16",), ("bf16", "bf16"))):
        calls.clear()
        with torch.no_grad():
            outputs[key] = runtime.set_attention(*args)(**_inputs(), return_dict=False)[0]
        # per block: self-attention over 3 x 2 x 2 = 12 tokens, then cross-attention to the 7 text tokens
        assert calls == [(12, self_mode), (7, cross_mode)] * TINY["num_layers"], key
    assert outputs["int8"].shape == (2, 4, 3, 4, 4)
    assert (outputs["int8"] - outputs["both"]).abs().max() > 0 and (outputs["int8"] - outputs["bf16"]).abs().max() > 0
    with pytest.raises(ValueError, match="attention must be one of"):
        runtime.set_attention("int8", cross_attention="fp4")


def _rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantized_attention_keeps_the_sampled_latent(tmp_path):
    """Quality row (CPU, tiny models): final latent of a 20-step sampling run, int8 attention (torch path) vs bf16.

    The W4A4 export of a tiny random model amplifies any perturbation (a flipped 4-bit activation code moves the
    next layer's input by a whole step): there the int8 attention must stay within the spread that running the same
    export in bfloat16 instead of float32 already causes. Without weight/activation quantization the int8 attention
    itself is measured: <= 2%.
    """
    _export_tiny(_diffusers_model(), tmp_path)
    export = {mode: _sample(WanRuntimeTransformer.from_export(tmp_path, attention=mode), steps=20)
              for mode in ("bf16", "int8")}
    in_fp32 = _sample(WanRuntimeTransformer.from_export(tmp_path, attention="bf16").float(), steps=20)
    rel_attention, rel_precision = _rel_l2(export["int8"], export["bf16"]), _rel_l2(export["bf16"], in_fp32)
    model = _diffusers_model()
    plain = {mode: _sample(WanRuntimeTransformer.from_state_dict(model.config, model.state_dict()).set_attention(mode),
                           steps=20) for mode in ("bf16", "int8")}
    rel_plain = _rel_l2(plain["int8"], plain["bf16"])
    print(f"20 steps, final latent rel L2: W4A4 export int8 vs bf16 attention {rel_attention:.2e} (bf16 vs fp32 "
          f"compute {rel_precision:.2e}); unquantized bf16 model int8 vs bf16 attention {rel_plain:.2e}")
    assert 0 < rel_attention <= 1.5 * rel_precision
    assert 0 < rel_plain <= 0.02


def test_rejects_what_it_does_not_run(tmp_path):
    with pytest.raises(ValueError, match="text-to-video only"):
        WanRuntimeTransformer({**TINY, "image_dim": 1280})
    model = _diffusers_model()
    runtime = WanRuntimeTransformer.from_state_dict(model.config, model.state_dict(), dtype=torch.float32)
    with pytest.raises(ValueError, match="one value per sample"):
        runtime(**{**_inputs(), "timestep": torch.tensor([1.0, 2.0, 3.0])})
    bad = dict(model.state_dict())
    bad.pop("proj_out.bias")
    with pytest.raises(ValueError, match=r"missing \['proj_out.bias'\]"):
        WanRuntimeTransformer.from_state_dict(model.config, bad)
