"""Kernel (b): the W4A4 / W3A3 GEMM against a float64 dequantize-and-multiply reference.

CPU: Triton interpreter at small shapes, int8 and fp8 code paths (no bf16 tl.dot there). GPU: full model
shapes, marked ``gpu``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated

import pytest  # noqa: E402

from qvgen_kernels.triton_env import INTERPRETER_HINT, interpreter_active  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    pytest.skip(INTERPRETER_HINT, allow_module_level=True)

from qvgen_kernels import codes  # noqa: E402
from qvgen_kernels.act_quant import quantize_per_token_torch  # noqa: E402
from qvgen_kernels.qgemm import PackedWeight, quant_matmul_torch  # noqa: E402
from qvgen_kernels.qgemm_triton import GemmConfig, quant_matmul_triton, unpack_weight  # noqa: E402
from qvgen_kernels.reference import dequant_matmul_float64  # noqa: E402
from tests.numerics import assert_rel_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(block_m=32, block_n=16, block_k=32, group_m=2, num_warps=4, num_stages=2)


def _problem(M, N, K, bits, seed, bias=True, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 2 + 0.5
    one = torch.full((1,), 0.9)
    act = quantize_per_token_torch(x.to(device), torch.zeros(1, dtype=torch.long, device=device), M,
                                   one.to(device), one.to(device), 0.95, bits)
    w = torch.randn(N, K, generator=gen)
    scale, zero = codes.weight_qparams_from_range(w.amin(1, keepdim=True), w.amax(1, keepdim=True), bits)
    zero = zero + torch.rand(N, 1, generator=gen) - 0.5          # LSQ+ zero points are learned floats
    q = codes.weight_codes(w, scale, zero, bits)
    weight = PackedWeight.from_packed(codes.pack_codes(q, bits).to(device), scale.to(device), zero.to(device), K, bits)
    b = (torch.randn(N, generator=gen) * 3).to(torch.bfloat16).to(device) if bias else None
    return act, weight, b


@pytest.mark.parametrize("variant, packed_b", [("ptr", False), ("ptr", True), ("tma", False),
                                               ("tma_persistent", False)])
@pytest.mark.parametrize("bits", [4, 3])
def test_matches_float64_reference(variant, packed_b, bits):
    M, N, K = 45, 40, 96          # M, N not multiples of the tiles; tails read as zeros / wrapped
    act, weight, bias = _problem(M, N, K, bits, seed=bits)
    ref = dequant_matmul_float64(act, weight, bias)
    codes_b = None if packed_b else unpack_weight(weight)
    config = GemmConfig(variant=variant, packed_b=packed_b, **SMALL)
    y32 = quant_matmul_triton(act, weight, codes_b, bias, torch.float32, config)
    assert_rel_close(y32, ref, rel=2e-6, what=f"{variant} fp32 output")
    y16 = quant_matmul_triton(act, weight, codes_b, bias, torch.bfloat16, config)
    assert y16.dtype == torch.bfloat16
    assert_rel_close(y16, ref, rel=8e-3, what=f"{variant} bf16 output")


def test_k_tail_and_no_bias():
    """K not a multiple of the K tile (masked loads), odd K in the packed container, no bias."""
    M, N, K = 33, 24, 75
    act, weight, _ = _problem(M, N, K, 4, seed=11, bias=False)
    ref = dequant_matmul_float64(act, weight)
    for variant, packed_b in (("ptr", False), ("ptr", True), ("tma", False)):   # tma: rows of 75 bytes fall back
        y = quant_matmul_triton(act, weight, None if packed_b else unpack_weight(weight), None, torch.float32,
                                GemmConfig(variant=variant, packed_b=packed_b, **SMALL))
        assert_rel_close(y, ref, rel=2e-6, what=f"{variant} packed_b={packed_b}")


def test_fp8_codes_path():
    M, N, K = 40, 32, 64
    act, weight, bias = _problem(M, N, K, 4, seed=5)
    act8 = type(act)(codes=act.codes.float().to(torch.float8_e4m3fn), scale=act.scale, zero=act.zero,
                     rowsum=act.rowsum, bits=act.bits)
    config = GemmConfig(**{**SMALL, "block_m": 64, "block_n": 32})    # fp8 needs wgmma-sized tiles on Hopper
    y = quant_matmul_triton(act8, weight, unpack_weight(weight, torch.float8_e4m3fn), bias, torch.float32, config)
    assert_rel_close(y, dequant_matmul_float64(act, weight, bias), rel=2e-6, what="fp8 codes")


def test_torch_path_matches_reference():
    act, weight, bias = _problem(50, 30, 70, 3, seed=3, device="cpu")
    assert_rel_close(quant_matmul_torch(act, weight, bias, torch.float32), dequant_matmul_float64(act, weight, bias),
                     rel=2e-6, what="torch path")


@pytest.mark.parametrize("k", [64, 75])
def test_unpack_kernel_matches_codes_py(k):
    _, weight, _ = _problem(4, 37, k, 4, seed=k)
    for dtype in (torch.int8, torch.float8_e4m3fn):
        got = unpack_weight(weight, dtype)
        assert torch.equal(got.float().cpu(), codes.unpack_codes(weight.packed, k).float().cpu())
    ws = torch.empty(37, k, dtype=torch.int8, device=DEVICE)
    assert unpack_weight(weight, out=ws) is ws


def test_rejects_mismatched_operands():
    act, weight, _ = _problem(8, 16, 32, 4, seed=1)
    with pytest.raises(ValueError, match="weight_codes must be"):
        quant_matmul_triton(act, weight, unpack_weight(weight)[:, :16], config=GemmConfig(**SMALL))
    _, other, _ = _problem(8, 16, 64, 4, seed=1)
    with pytest.raises(ValueError, match="activation has 32 features, weight expects 64"):
        quant_matmul_triton(act, other, unpack_weight(other), config=GemmConfig(**SMALL))
    with pytest.raises(ValueError, match="variant"):
        GemmConfig(variant="cublas")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")  # also without the conftest
@pytest.mark.parametrize("K, N", [(5120, 5120), (5120, 13824), (13824, 5120), (1536, 8960)])
def test_full_shapes_on_gpu(K, N):
    M = 4096
    act, weight, bias = _problem(M, N, K, 4, seed=N)
    ref = dequant_matmul_float64(act, weight, bias)
    w8 = unpack_weight(weight)
    for config in (None, GemmConfig(variant="tma"), GemmConfig(variant="tma_persistent")):
        y = quant_matmul_triton(act, weight, w8, bias, torch.float32, config)
        assert_rel_close(y, ref, rel=2e-6, what=f"{config} at {M}x{K}x{N}")
        assert torch.isfinite(y).all()
    y16 = quant_matmul_triton(act, weight, w8, bias, torch.bfloat16)
    assert_rel_close(y16, ref, rel=8e-3, what="bf16 output")
