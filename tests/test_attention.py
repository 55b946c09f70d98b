"""Quantized attention, torch path (the CPU fallback and the kernel's twin): against float64 and SDPA; dispatch.

The Triton kernels are tested against this path in tests/test_attention_triton.py.
"""
import pytest
import torch

from qvgen_kernels.attention import (P_SCALE, QKPrep, attention, attention_float64, check_mode, default_mode,
                                     quantize_qk_torch, quantized_attention_torch, sdpa)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def qkv(B, SQ, SK, H, D, seed=0, scale=1.0, k_offset=0.3):
    """Unit-RMS q/k as after the runtime's q/k norms (logits of std ``scale**2``), keys offset per channel."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, SQ, H, D, generator=gen) * scale
    k = torch.randn(B, SK, H, D, generator=gen) * scale + k_offset * torch.randn(1, 1, H, D, generator=gen)
    v = torch.randn(B, SK, H, D, generator=gen) + 0.2
    return q, k, v


SHAPES = [(2, 45, 70, 3, 64, 32),     # tails in both lengths
          (1, 33, 16, 2, 128, 64),    # fewer keys than a block
          (1, 100, 7, 2, 64, 16),     # cross-attention to a short text
          (1, 64, 300, 1, 32, 64)]


@pytest.mark.parametrize("B, SQ, SK, H, D, block_n", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_matches_float64_and_sdpa(B, SQ, SK, H, D, block_n, scale):
    q, k, v = qkv(B, SQ, SK, H, D, scale=scale)
    got = quantized_attention_torch(q, k, v, block_n)
    assert got.shape == (B, SQ, H, D) and got.dtype == q.dtype
    exact = attention_float64(q, k, v)
    assert cosine(got, exact) >= 0.999
    assert cosine(got, sdpa(q, k, v)) >= 0.999
    # the fp16 P V variant isolates the int8 Q K error: closer still
    assert cosine(quantized_attention_torch(q, k, v, block_n, pv="fp16"), exact) >= cosine(got, exact) - 1e-4


def test_key_smoothing_makes_a_large_key_offset_harmless():
    """Keys sharing a large offset (as projections with a bias produce) would leave a few int8 levels for what
    varies; subtracting the mean over the sequence removes the offset, and the softmax does not see it."""
    q, k, v = qkv(1, 64, 256, 2, 64, seed=3)
    k_shifted = k + 40.0 * torch.randn(1, 1, 2, 64, generator=torch.Generator().manual_seed(4))
    exact = attention_float64(q, k_shifted, v)
    assert cosine(quantized_attention_torch(q, k_shifted, v), exact) >= 0.999
    _, _, k_codes, _, _, _ = quantize_qk_torch(q, k_shifted, v, 64)
    assert k_codes.abs().amax() == 127 and k_codes.float().mean(dim=2).abs().max() < 2


def test_codes_and_scales():
    q, k, v = qkv(2, 40, 50, 2, 64, seed=5)
    q_codes, q_scale, k_codes, k_scale, v_codes, v_scale = quantize_qk_torch(q, k, v, 16)
    assert q_codes.shape == (2, 2, 40, 64) and q_scale.shape == (2, 2, 40)
    assert torch.equal(q_codes.abs().amax(-1), torch.full((2, 2, 40), 127.0))      # each token row reaches 127
    assert k_scale.shape == (2, 2, 4) and k_codes.shape == (2, 2, 50, 64)
    assert v_codes.abs().amax(dim=2).max() == P_SCALE and v_scale.shape == (2, 2, 64)
    q_hat = q_codes * (q_scale / (64 ** -0.5 * 1.4426950408889634))[..., None]
    assert (q_hat - q.transpose(1, 2)).abs().max() <= q.abs().max() / 127


def test_all_zero_rows_and_blocks_stay_finite():
    q, k, v = qkv(1, 20, 40, 1, 32)
    q[:, :5] = 0
    k[:, :16] = k[:, :16].mean(dim=1, keepdim=True)      # a block equal to the mean: all-zero smoothed codes
    out = quantized_attention_torch(q, k, v, 16)
    assert torch.isfinite(out).all()
    assert cosine(out, attention_float64(q, k, v)) >= 0.999


def test_dispatch_and_refusals():
    q, k, v = qkv(1, 24, 24, 2, 32)
    assert torch.equal(attention(q, k, v, "bf16"), sdpa(q, k, v))
    assert torch.equal(attention(q, k, v, "int8"), quantized_attention_torch(q, k, v))   # CPU: the torch path
    assert default_mode("cpu") == "bf16"
    if torch.cuda.is_available():       # int8 by default on Hopper only, the one kind it has been validated on
        assert default_mode("cuda") == ("int8" if torch.cuda.get_device_capability() == (9, 0) else "bf16")
    with pytest.raises(ValueError, match="attention must be one of"):
        check_mode("fp4")
    with pytest.raises(ValueError, match=r"q \[B, Sq, H, D\]"):
        attention(q, k[:, :, :1], v, "int8")
    with pytest.raises(ValueError, match="pv must be one of"):
        quantized_attention_torch(q, k, v, pv="bf16")
    with pytest.raises(ValueError, match="needs its weight"):
        QKPrep("rms_row")
    with pytest.raises(ValueError, match="both rotary tables"):
        QKPrep(cos=torch.ones(2, 2))
