"""The runtime transformers on the Triton path: the quantized attention (q/k norm and RoPE fused into its
quantization) against the torch path and bf16 attention; Wan's fused block against its unfused form; CUDA graphs.

CPU: Triton's interpreter (run by tests/test_kernels_interpreter.py), tiny configs with a head dim the kernel has.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated

import pytest  # noqa: E402

from qvgen_kernels.triton_env import INTERPRETER_HINT, interpreter_active, on_hopper  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    pytest.skip(INTERPRETER_HINT, allow_module_level=True)

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel  # noqa: E402

from qvgen_kernels import attention_triton, cogvideox_model, norm_quant_triton, wan_model  # noqa: E402
from qvgen_kernels.cogvideox_model import CogVideoXRuntimeTransformer  # noqa: E402
from qvgen_kernels.linear import QuantizedLinear  # noqa: E402
from qvgen_kernels.wan_model import WanRuntimeTransformer  # noqa: E402
from tests.numerics import max_rel_diff  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
COGVIDEOX_5B = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=8,
                    text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
                    max_text_seq_length=8, use_rotary_positional_embeddings=True)


def _runtime(diffusers_cls, runtime_cls, cfg):
    torch.manual_seed(0)
    ref = diffusers_cls(**cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return runtime_cls.from_state_dict(ref.config, ref.state_dict(), dtype=torch.float32).to(DEVICE)


def _outputs(model, call, module, monkeypatch):
    out = {}
    with torch.no_grad():
        out["bf16"] = call(model.set_attention("bf16"))
        out["triton"] = call(model.set_attention("int8"))
        with monkeypatch.context() as m:            # the same model on the torch path of the quantized attention
            m.setattr(module, "triton_usable", lambda q: False)
            out["torch"] = call(model)
    return out


@pytest.mark.parametrize("family", ["wan", "cogvideox_5b"])
def test_fused_attention_path_matches_the_torch_path(family, monkeypatch):
    """Wan: RMSNorm across heads + RoPE. CogVideoX-5B: per-head LayerNorm, RoPE on the video tokens after the text."""
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([999.0, 321.5], device=DEVICE)
    if family == "wan":
        model, module = _runtime(WanTransformer3DModel, WanRuntimeTransformer, WAN), wan_model
        x, text = torch.randn(2, 4, 3, 8, 8, generator=gen).to(DEVICE), torch.randn(2, 7, 16, generator=gen).to(DEVICE)
        call = lambda m: m(x, t, text, return_dict=False)[0]            # noqa: E731
    else:
        model = _runtime(CogVideoXTransformer3DModel, CogVideoXRuntimeTransformer, COGVIDEOX_5B)
        module = cogvideox_model
        x, text = torch.randn(2, 2, 4, 8, 8, generator=gen).to(DEVICE), torch.randn(2, 8, 16, generator=gen).to(DEVICE)
        call = lambda m: m(x, text, t, return_dict=False)[0]            # noqa: E731
    keys = []                       # key lengths the Triton kernel sees: self / joint attention only
    real = attention_triton.quantized_attention_triton
    monkeypatch.setattr(attention_triton, "quantized_attention_triton",
                        lambda q, k, *a, **kw: keys.append(k.shape[1]) or real(q, k, *a, **kw))
    out = _outputs(model, call, module, monkeypatch)
    # a block's int8 call, fused and with the prep in torch ops: never with Wan's 7 text keys (SDPA there)
    tokens = 3 * 4 * 4 if family == "wan" else 8 + 2 * 4 * 4
    assert keys == [tokens] * (2 * model.config.num_layers)
    assert max_rel_diff(out["triton"], out["torch"]) <= 2e-2
    assert 0 < max_rel_diff(out["triton"], out["bf16"]) <= 5e-2


def _tiny_w4a4_wan(tmp_path):
    from tests.test_runtime_wan import _export_tiny
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**WAN).eval()
    _export_tiny(ref, tmp_path)
    model = WanRuntimeTransformer.from_export(tmp_path, DEVICE, attention="bf16")
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.backend = "triton"                  # the interpreter too (auto picks Triton on CUDA tensors only)
    return model


def _wan_inputs():
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 3, 8, 8, generator=gen).to(DEVICE), torch.tensor([999.0, 321.5], device=DEVICE),
            torch.randn(2, 7, 16, generator=gen).to(DEVICE))


def test_wan_fused_block_matches_the_unfused_block(tmp_path, monkeypatch):
    """W4A4 export: norm + modulation + codes in one kernel, residual and GELU in the GEMM epilogues, against the
    same export with every element-wise step apart (both on the Triton kernels)."""
    model = _tiny_w4a4_wan(tmp_path)
    calls = []
    real = norm_quant_triton.norm_quantize_triton
    monkeypatch.setattr(norm_quant_triton, "norm_quantize_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = _wan_inputs()
    with torch.no_grad():
        default = model(*inputs, return_dict=False)[0]      # a new model: fused on Hopper, unfused elsewhere
        hopper = on_hopper(inputs[0])
        assert len(calls) == (3 * WAN["num_layers"] if hopper else 0)
        calls.clear()
        unfused = model.set_fusion(False)(*inputs, return_dict=False)[0]
        assert not calls
        fused = model.set_fusion(True)(*inputs, return_dict=False)[0]
    assert len(calls) == 3 * WAN["num_layers"]              # q/k/v, cross-attention q, FFN up: per block
    assert torch.equal(default, fused if hopper else unfused)
    if DEVICE == "cpu":     # the interpreter's layer norm and tanh round as torch's CPU kernels here
        assert torch.equal(fused, unfused)
    else:                   # a GPU's fused GELU / mean may differ in a last float32 bit: a rare flipped code
        assert max_rel_diff(fused, unfused) <= 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["bf16", "int8"])
def test_cuda_graph_replays_the_forward(tmp_path, attention):
    model = _tiny_w4a4_wan(tmp_path).set_attention(attention)
    x, t, text = _wan_inputs()
    with torch.no_grad():
        eager = model(x, t, text, return_dict=False)[0]
        model.enable_cuda_graphs()
        first = model(x, t, text, return_dict=False)[0]             # captures
        other_t = model(x, t - 100.0, text, return_dict=False)[0]   # replays with other timesteps (other groups)
        again = model(x, t, text, return_dict=False)[0]
        model.enable_cuda_graphs(False)
        eager_other = model(x, t - 100.0, text, return_dict=False)[0]
    assert len(model._graphed.graphs if model._graphed else [1]) == 1
    assert torch.equal(first, again) and max_rel_diff(first, eager) <= 1e-2
    assert max_rel_diff(other_t, eager_other) <= 1e-2 and (other_t - first).abs().max() > 0
