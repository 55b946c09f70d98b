"""The runtime transformers with the Triton quantized attention (q/k norm and RoPE fused into its quantization)
against the same models on the torch path of the quantized attention and on bf16 (SDPA) attention.

CPU: Triton's interpreter (run by tests/test_kernels_interpreter.py), tiny configs with a head dim the kernel has.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated

import pytest  # noqa: E402

from qvgen_kernels.triton_env import INTERPRETER_HINT, interpreter_active  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    pytest.skip(INTERPRETER_HINT, allow_module_level=True)

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel  # noqa: E402

from qvgen_kernels import cogvideox_model, wan_model  # noqa: E402
from qvgen_kernels.cogvideox_model import CogVideoXRuntimeTransformer  # noqa: E402
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


def test_wan_fused_path_matches_the_torch_path(monkeypatch):
    model = _runtime(WanTransformer3DModel, WanRuntimeTransformer, WAN)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen).to(DEVICE)
    text = torch.randn(2, 7, 16, generator=gen).to(DEVICE)
    t = torch.tensor([999.0, 321.5], device=DEVICE)
    out = _outputs(model, lambda m: m(x, t, text, return_dict=False)[0], wan_model, monkeypatch)
    assert max_rel_diff(out["triton"], out["torch"]) <= 2e-2
    assert 0 < max_rel_diff(out["triton"], out["bf16"]) <= 5e-2


def test_cogvideox_fused_path_matches_the_torch_path(monkeypatch):
    """5B style: per-head LayerNorm and RoPE on the video tokens only (the text comes first)."""
    model = _runtime(CogVideoXTransformer3DModel, CogVideoXRuntimeTransformer, COGVIDEOX_5B)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 4, 8, 8, generator=gen).to(DEVICE)
    text = torch.randn(2, 8, 16, generator=gen).to(DEVICE)
    t = torch.tensor([999.0, 321.5], device=DEVICE)
    out = _outputs(model, lambda m: m(x, text, t, return_dict=False)[0], cogvideox_model, monkeypatch)
    assert max_rel_diff(out["triton"], out["torch"]) <= 2e-2
    assert 0 < max_rel_diff(out["triton"], out["bf16"]) <= 5e-2
