"""Quantized attention, Triton kernels: against the torch twin (same math), float64 and SDPA.

CPU: Triton's interpreter at small shapes and small tiles (fp8 casts pre-rounded there: ``_to_fp8``), run by
tests/test_kernels_interpreter.py. GPU: full model shapes with the default tiles, marked ``gpu``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated

import pytest  # noqa: E402

from qvgen_kernels.triton_env import INTERPRETER_HINT, interpreter_active  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    pytest.skip(INTERPRETER_HINT, allow_module_level=True)

from qvgen_kernels.attention import (QKPrep, attention_float64, quantize_qk_torch,  # noqa: E402
                                     quantized_attention_torch, sdpa)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qvgen_kernels.attention_triton import (AttentionConfig, _exp2_poly, attention_from_codes,  # noqa: E402
                                            quantize_k, quantize_q, quantize_qkv, quantize_v,
                                            quantized_attention_triton)
from qvgen_kernels.runtime_parts import apply_interleaved_rope  # noqa: E402
from tests.numerics import max_rel_diff  # noqa: E402
from tests.test_attention import cosine, qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def small(block_n, pv="fp8"):
    return AttentionConfig(block_m=32, block_n=block_n, num_warps=4, num_stages=2, pv=pv)


def _even_first(d):
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def test_quantization_passes_match_the_torch_codes():
    q, k, v = (t.to(DEVICE) for t in qkv(2, 45, 70, 3, 64, seed=1))
    ref = quantize_qk_torch(q, k, v, 32)
    perm = _even_first(64).to(DEVICE)
    q_codes, q_scale = quantize_q(q)
    k_codes, k_scale, mean = quantize_k(k, 32)
    vt, v_scale = quantize_v(v)
    assert q_codes.dtype == k_codes.dtype == torch.int8 and vt.dtype == torch.float8_e4m3fn
    assert torch.equal(q_codes.float(), ref[0][..., perm]) and torch.allclose(q_scale, ref[1], rtol=1e-6)
    assert (k_codes.float() - ref[2][..., perm]).abs().max() <= 1        # the mean's summation order may differ
    assert torch.allclose(k_scale, ref[3], rtol=1e-5)
    assert torch.allclose(mean, k.float().mean(1)[..., perm], atol=1e-6)
    assert vt.shape == (2, 3, 64, 80) and torch.equal(vt[..., 70:].float(), torch.zeros(2, 3, 64, 10, device=DEVICE))
    assert torch.equal(vt[..., :70].float().transpose(-1, -2), ref[4]) and torch.equal(v_scale, ref[5])


@pytest.mark.parametrize("B, SQ, SK, H, D, block_n", [(2, 45, 70, 3, 64, 32), (1, 33, 16, 2, 128, 16),
                                                       (1, 50, 7, 2, 64, 16), (1, 40, 96, 2, 32, 32)])
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_kernel_matches_torch_twin_and_float64(B, SQ, SK, H, D, block_n, pv):
    if pv == "fp8":
        block_n = max(block_n, 32)            # fp8 tensor-core products take K >= 32 (AttentionConfig refuses less)
    q, k, v = (t.to(DEVICE) for t in qkv(B, SQ, SK, H, D, seed=SQ, scale=1.5))
    got = quantized_attention_triton(q, k, v, config=small(block_n, pv))
    assert got.shape == (B, SQ, H, D) and torch.isfinite(got).all()
    twin = quantized_attention_torch(q, k, v, block_n, pv)
    assert max_rel_diff(got, twin) <= 2e-2                   # a few fp8 roundings of P fall the other way
    assert cosine(got, twin) >= 0.99999
    assert cosine(got, attention_float64(q, k, v)) >= 0.999


def test_strided_views_and_output_buffer():
    """The runtime hands views of [B, S, H * D] projections; the result can land in a given buffer."""
    q, k, v = (t.to(DEVICE) for t in qkv(1, 40, 40, 2, 64, seed=7))
    fused = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)           # [B, S, 3 * H * D]
    qv, kv, vv = (fused[..., i * 128:(i + 1) * 128].unflatten(-1, (2, 64)) for i in range(3))
    assert not qv.is_contiguous()
    out = torch.empty(1, 40, 2, 64, device=DEVICE)
    res = quantized_attention_triton(qv, kv, vv, config=small(32), out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.allclose(res, quantized_attention_triton(q, k, v, config=small(32)), atol=1e-6)


def _wan_prep(x, norm_w, cos, sin, eps=1e-6):
    xf = x.float().flatten(2)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_w
    return apply_interleaved_rope(xf.unflatten(2, x.shape[2:]), cos[None, :, None], sin[None, :, None])


def _rope_tables(S, D, seed):
    angles = torch.rand(S, D // 2, generator=torch.Generator().manual_seed(seed)) * 6.3
    return angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)


def test_fused_rms_norm_and_rope_match_torch():
    """Wan: RMSNorm over all heads of a token, then interleaved RoPE; fused into the Q/K passes."""
    B, S, H, D = 2, 48, 2, 64
    q, k, v = (t.to(DEVICE) * 3 for t in qkv(B, S, S, H, D, seed=11))
    gen = torch.Generator().manual_seed(12)
    wq, wk = ((1 + 0.3 * torch.randn(H * D, generator=gen)).to(DEVICE) for _ in range(2))
    cos, sin = (t.to(DEVICE) for t in _rope_tables(S, D, 13))
    got = quantized_attention_triton(q, k, v, QKPrep("rms_row", wq, cos=cos, sin=sin),
                                     QKPrep("rms_row", wk, cos=cos, sin=sin), config=small(32))
    qp, kp = _wan_prep(q, wq, cos, sin), _wan_prep(k, wk, cos, sin)
    assert max_rel_diff(got, quantized_attention_torch(qp, kp, v, 32)) <= 2e-2
    assert cosine(got, attention_float64(qp, kp, v)) >= 0.999


def test_head_parallel_passes_with_rms_norm_and_rope_match_the_torch_codes():
    """Wan's prep (RMSNorm across all 3 heads of a token, then RoPE) fused into the Q/K passes, which run one program
    per head and read the token's rstd from a pass of its own: the codes and scales of the torch reference on the
    torch-normalized and rotated Q/K, for inputs that are strided views of a wider projection as in the runtime."""
    B, S, H, D = 2, 45, 3, 64
    q, k, v = (t * 3 for t in qkv(B, S, S, H, D, seed=31))
    wide = torch.cat([q.flatten(2), k.flatten(2)], dim=-1).to(DEVICE)                 # [B, S, 2 * H * D]
    qv, kv = wide[..., :H * D].unflatten(-1, (H, D)), wide[..., H * D:].unflatten(-1, (H, D))
    gen = torch.Generator().manual_seed(32)
    wq, wk = ((1 + 0.3 * torch.randn(H * D, generator=gen)).to(DEVICE) for _ in range(2))
    cos, sin = (t.to(DEVICE) for t in _rope_tables(S, D, 33))
    qp, kp = _wan_prep(qv, wq, cos, sin), _wan_prep(kv, wk, cos, sin)
    ref = quantize_qk_torch(qp, kp, v.to(DEVICE), 32)
    perm = _even_first(D).to(DEVICE)
    q_codes, q_scale = quantize_q(qv, QKPrep("rms_row", wq, cos=cos, sin=sin))
    k_codes, k_scale, mean = quantize_k(kv, 32, QKPrep("rms_row", wk, cos=cos, sin=sin))
    dq, dk = (q_codes.float() - ref[0][..., perm]).abs(), (k_codes.float() - ref[2][..., perm]).abs()
    if DEVICE == "cpu":     # the interpreter's sums round as torch's here: every code equal
        assert dq.max() == 0 and dk.max() == 0
    else:                   # a GPU's rstd and mean may differ in a last float32 bit: a rare code one off
        assert dq.max() <= 1 and dk.max() <= 1 and (dq > 0).float().mean() <= 1e-3
    assert torch.allclose(q_scale, ref[1], rtol=1e-6) and torch.allclose(k_scale, ref[3], rtol=1e-6)
    assert torch.allclose(mean, kp.float().mean(1)[..., perm], atol=1e-6)
    assert (q_codes.float().abs().amax(-1) == 127).all()          # every token and head uses its full range


def test_fused_head_layer_norm_and_partial_rope_match_torch():
    """CogVideoX: LayerNorm over each head (weight and bias), RoPE on the video tokens after the text."""
    B, S, H, D, text = 1, 40, 2, 64, 8
    q, k, v = (t.to(DEVICE) * 2 + 1 for t in qkv(B, S, S, H, D, seed=21))
    gen = torch.Generator().manual_seed(22)
    w, b = (1 + 0.2 * torch.randn(D, generator=gen)).to(DEVICE), (0.1 * torch.randn(D, generator=gen)).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in _rope_tables(S - text, D, 23))
    prep = QKPrep("layer_head", w, b, 1e-6, cos, sin, rope_start=text)
    got = quantized_attention_triton(q, k, v, prep, prep, config=small(32))

    def torch_prep(x):
        x = torch.nn.functional.layer_norm(x.float(), (D,), w, b, 1e-6)
        return torch.cat([x[:, :text], apply_interleaved_rope(x[:, text:], cos[None, :, None], sin[None, :, None])], 1)
    qp, kp = torch_prep(q), torch_prep(k)
    assert max_rel_diff(got, quantized_attention_torch(qp, kp, v, 32)) <= 2e-2
    assert cosine(got, attention_float64(qp, kp, v)) >= 0.999


def test_refusals():
    q, k, v = qkv(1, 8, 8, 1, 48)
    with pytest.raises(ValueError, match="head dim 48 is not supported"):
        quantized_attention_triton(q, k, v)
    q, k, v = qkv(1, 8, 8, 1, 64)
    with pytest.raises(ValueError, match="do not match"):
        quantized_attention_triton(q, k[:, :, :, :32], v)
    with pytest.raises(ValueError, match="rotary tables cover 3 tokens"):
        quantized_attention_triton(q, k, v, QKPrep(cos=torch.ones(3, 64), sin=torch.ones(3, 64)))
    with pytest.raises(ValueError, match="power of two"):
        AttentionConfig(block_n=48)
    with pytest.raises(ValueError, match="fp8 P.V needs block_n >= 32"):
        AttentionConfig(block_n=16, pv="fp8")
    AttentionConfig(block_n=16, pv="fp16")


# ------------------------------------------------------------------------------------------ GPU, full shapes
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("SQ, SK, H, D", [(32760, 32760, 2, 128),      # Wan 480p x 81 frames, self
                                          (32760, 512, 2, 128),        # Wan cross-attention to the text
                                          (17776, 17776, 2, 64),       # CogVideoX 49 frames, joint
                                          (75600, 75600, 1, 128)])     # Wan 720p x 81 frames
def test_full_shapes_against_sdpa_and_float64(SQ, SK, H, D):
    q, k, v = (t.to("cuda", torch.bfloat16) for t in qkv(1, SQ, SK, H, D, seed=SK, scale=1.5))
    got = quantized_attention_triton(q, k, v)
    ref = sdpa(q, k, v)
    assert torch.isfinite(got).all()
    c_sdpa = cosine(got, ref)
    rows = torch.randperm(SQ, generator=torch.Generator().manual_seed(0))[:256].cuda()
    c_exact = cosine(got[:, rows], attention_float64(q[:, rows], k, v))
    print(f"cosine vs SDPA {c_sdpa:.6f}, vs float64 (256 rows) {c_exact:.6f}")
    assert c_sdpa >= 0.999 and c_exact >= 0.999


def test_warp_specialized_key_loop_computes_the_same_attention():
    """AttentionConfig.warp_specialize only reschedules the key loop (Triton's automatic warp specialization): the
    same operands, the same result. On a GPU this is the test that the Hopper pass compiles the kernel at all."""
    q, k, v = (t.to(DEVICE) for t in qkv(1, 70, 96, 2, 64, seed=5))
    plain = quantized_attention_triton(q, k, v, config=small(32))
    specialized = quantized_attention_triton(
        q, k, v, config=AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=2, warp_specialize=True))
    assert torch.allclose(specialized.float(), plain.float(), rtol=1e-3, atol=1e-3)


@triton.jit
def _exp2_poly_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, _exp2_poly(tl.load(x_ptr + i)))


def test_emulated_exp2_is_within_its_bound_over_the_logit_range():
    """The cubic 2**x of AttentionConfig.emulate_exp2 against torch's, over the range the kernel feeds it
    (log2(448) down to where 2**x vanishes in fp8): relative error <= 1e-4, and tiny below the clamp."""
    x = torch.cat([torch.linspace(-124.9, 8.81, 4096), torch.tensor([-130.0, -1e30, 0.0, 0.5, -0.5, 1.0])])
    n = 8192
    x = torch.cat([x, torch.zeros(n - x.numel())]).to(DEVICE)
    y = torch.empty_like(x)
    _exp2_poly_kernel[(1,)](x, y, N=n)
    ref = torch.exp2(x.double())
    ok = x >= -125
    assert float(((y.double() - ref).abs() / ref)[ok].max()) <= 1e-4
    assert float(y[~ok].max()) <= 2.0 ** -124


@pytest.mark.parametrize("sk", [96, 70], ids=["whole_blocks", "partial_last"])
def test_emulated_exp2_attention_stays_on_the_reference(sk):
    """Half of P from the cubic: the output moves by far less than fp8 P's own rounding, and stays at cosine >= 0.999
    against float64."""
    q, k, v = (t.to(DEVICE) for t in qkv(1, 70, sk, 2, 64, seed=8, scale=1.5))
    plain = quantized_attention_triton(q, k, v, config=small(32))
    exact = attention_float64(q, k, v)
    cfg = AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=2, emulate_exp2=True)
    got = quantized_attention_triton(q, k, v, config=cfg)
    assert cosine(got, exact) >= 0.999
    assert not torch.equal(got, plain), "emulate_exp2 changed nothing: the cubic is not in the kernel"
    assert max_rel_diff(got, plain) <= 0.25 * max_rel_diff(plain, exact)


def test_gluon_kernel_is_refused_off_hopper_and_at_other_tiles():
    with pytest.raises(ValueError, match="64 x 128 tiles with 4 warps or 128 x 128 with 8"):
        AttentionConfig(block_m=128, num_warps=4, kernel="gluon")
    assert AttentionConfig.gluon(3, block_m=128).num_warps == 8
    with pytest.raises(ValueError, match="warp_specialize at 128 rows only"):
        AttentionConfig.gluon(2, block_m=64, warp_specialize=True)
    with pytest.raises(ValueError, match="kernel must be one of"):
        AttentionConfig(kernel="cuda")
    if torch.cuda.is_available():
        return
    q, k, v = qkv(1, 70, 96, 2, 64, seed=3)
    with pytest.raises(ValueError, match=r"Hopper GPU \(sm_90\) only"):
        quantized_attention_triton(q, k, v, config=AttentionConfig.gluon())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("SQ, SK, H, D, stages, block_m, ws", [
    # every config at a partial last key block turning the ring several times, and at Wan 480p self-attention
    *[(S, S2, 2, 128, st, bm, ws) for S, S2 in ((300, 1000), (32760, 32760))
      for st in (2, 3) for bm, ws in ((64, False), (128, False), (128, True))],
    (200, 256, 2, 64, 2, 64, False), (200, 256, 2, 64, 3, 128, False), (200, 256, 2, 64, 2, 128, True),   # d = 64
    (100, 100, 1, 128, 3, 64, False), (100, 100, 1, 128, 3, 128, True),   # one key block, fewer than the slots
    (4096, 512, 4, 128, 2, 64, False), (4096, 512, 4, 128, 2, 128, True)])  # Wan cross-attention to the text
def test_gluon_kernel_computes_what_the_triton_kernel_computes(SQ, SK, H, D, stages, block_m, ws):
    """The same operands through both kernels: the same math in the same order of accumulation, so the outputs
    agree to bf16 rounding; and both stay on float64."""
    q, k, v = (t.to("cuda", torch.bfloat16) for t in qkv(1, SQ, SK, H, D, seed=SK + D, scale=1.5))
    cfg = AttentionConfig(block_m=64, block_n=128, num_warps=4, num_stages=stages)
    qkv_codes = quantize_qkv(q, k, v, config=cfg)
    ref = attention_from_codes(qkv_codes, torch.empty_like(q), cfg)
    got = attention_from_codes(qkv_codes, torch.empty_like(q), AttentionConfig.gluon(stages, block_m,
                                                                                     warp_specialize=ws))
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    assert max_rel_diff(got, ref) <= 1e-2, max_rel_diff(got, ref)
    rows = torch.randperm(SQ, generator=torch.Generator().manual_seed(0))[:128].cuda()
    assert cosine(got[:, rows], attention_float64(q[:, rows], k, v)) >= 0.999
