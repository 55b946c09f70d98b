"""Fused producers of the runtime: LayerNorm + modulation + per-token codes (``norm_quant_triton``) and the GEMM
epilogues (``qgemm.Epilogue``: GELU, gated residual).

The codes must be ``codes.act_*`` of the normalized activation bit for bit; the residual epilogue must equal the
unfused update bit for bit. CPU: Triton's interpreter at small shapes (run by tests/test_kernels_interpreter.py);
GPU: model widths, marked ``gpu``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated

import pytest  # noqa: E402

from qvgen_kernels.triton_env import INTERPRETER_HINT, interpreter_active  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    pytest.skip(INTERPRETER_HINT, allow_module_level=True)

from qvgen_kernels.act_quant import quantize_per_token_torch  # noqa: E402
from qvgen_kernels.norm_quant import ClipTarget, NormSpec, norm_modulate_torch  # noqa: E402
from qvgen_kernels.norm_quant_triton import norm_quantize_triton  # noqa: E402
from qvgen_kernels.qgemm import Epilogue, apply_epilogue_torch  # noqa: E402
from qvgen_kernels.qgemm_triton import GemmConfig, quant_matmul_triton, unpack_weight  # noqa: E402
from tests.numerics import max_rel_diff  # noqa: E402
from tests.test_kernels_gemm import SMALL, _problem  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _norm_problem(B, S, K, affine, modulate, n_targets, seed=0, bits=4):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B * S, K, generator=gen) * 3 + 1).bfloat16()
    x[0, :5] = 40.0                                                          # an outlier row
    rnd = lambda *s: torch.randn(*s, generator=gen)                          # noqa: E731
    spec = NormSpec(1e-6, rnd(K).bfloat16() if affine else None, (rnd(K) * 0.1).bfloat16() if affine else None,
                    rnd(B, K) * 0.3 if modulate else None, rnd(B, K) * 0.3 if modulate else None)
    targets = [ClipTarget(torch.rand(10, generator=gen) * 0.2 + 0.8, torch.rand(10, generator=gen) * 0.2 + 0.8,
                          0.95, bits) for _ in range(n_targets)]
    groups = torch.randint(0, 10, (B,), generator=gen)
    move = lambda t: None if t is None else t.to(DEVICE)                     # noqa: E731
    spec = NormSpec(spec.eps, move(spec.weight), move(spec.bias), move(spec.shift), move(spec.scale))
    targets = [ClipTarget(move(t.clip_lower), move(t.clip_upper), t.clip_ratio, t.bits) for t in targets]
    return x.to(DEVICE), spec, targets, groups.to(DEVICE)


def _check_norm_quant(B, S, K, affine, modulate, n_targets, bits=4, h_tolerance=0.0):
    x, spec, targets, groups = _norm_problem(B, S, K, affine, modulate, n_targets, bits=bits)
    h = torch.empty_like(x)
    got = norm_quantize_triton(x, spec, targets, groups, S, h_out=h)
    ref_h = norm_modulate_torch(x, spec, S)
    differ = float((h != ref_h).float().mean())
    assert differ <= h_tolerance and max_rel_diff(h, ref_h) <= 1e-2, differ
    for t, act in zip(targets, got):         # the codes are codes.act_* of the kernel's h, bit for bit
        ref = quantize_per_token_torch(h, groups, S, t.clip_lower, t.clip_upper, t.clip_ratio, t.bits)
        for name in ("codes", "scale", "zero", "rowsum"):
            assert torch.equal(getattr(act, name), getattr(ref, name)), name


@pytest.mark.parametrize("K, affine, modulate, n_targets", [(96, False, True, 3), (200, True, False, 1),
                                                            (1100, False, True, 2), (64, True, True, 1)])
def test_norm_quant_codes_are_those_of_the_normalized_activation(K, affine, modulate, n_targets):
    # the interpreter computes h exactly as torch's CPU layer_norm here; a GPU may differ in a rare last bit
    _check_norm_quant(2, 7, K, affine, modulate, n_targets, h_tolerance=0.0 if DEVICE == "cpu" else 1e-3)


def test_norm_quant_three_bits_and_refusals():
    _check_norm_quant(1, 9, 128, False, True, 3, bits=3, h_tolerance=0.0 if DEVICE == "cpu" else 1e-3)
    x, spec, targets, groups = _norm_problem(2, 4, 64, False, True, 1)
    with pytest.raises(ValueError, match="between 1 and 3 consumers"):
        norm_quantize_triton(x, spec, targets * 4, groups, 4)
    with pytest.raises(ValueError, match="share bit width and clip ratio"):
        norm_quantize_triton(x, spec, [targets[0], ClipTarget(targets[0].clip_lower, targets[0].clip_upper, 0.9, 4)],
                             groups, 4)
    with pytest.raises(ValueError, match=r"modulation shift must be \[2, 64\]"):
        norm_quantize_triton(x, NormSpec(1e-6, shift=spec.shift[:1], scale=spec.scale[:1]), targets, groups, 4)
    with pytest.raises(ValueError, match="both shift and scale"):
        NormSpec(1e-6, shift=spec.shift)


def _gemm_case(M, N, K, seed):
    act, weight, bias = _problem(M, N, K, 4, seed=seed)
    return act, weight, unpack_weight(weight), bias


@pytest.mark.parametrize("variant", ["ptr", "tma", "tma_persistent"])
@pytest.mark.parametrize("gated", [True, False])
def test_residual_epilogue_is_bit_identical_to_the_unfused_update(variant, gated):
    M, N, K, rows = 45, 40, 96, 15                  # three samples of 15 rows
    act, weight, codes_b, bias = _gemm_case(M, N, K, seed=5)
    gen = torch.Generator().manual_seed(6)
    residual = (torch.randn(M, N, generator=gen) * 4).bfloat16().to(DEVICE)
    gate = (torch.randn(3, N, generator=gen)).to(DEVICE) if gated else None
    epi = Epilogue("residual", residual, gate, rows)
    config = GemmConfig(variant=variant, **SMALL)
    fused = quant_matmul_triton(act, weight, codes_b, bias, torch.bfloat16, config, epilogue=epi)
    unfused = apply_epilogue_torch(quant_matmul_triton(act, weight, codes_b, bias, torch.bfloat16, config), epi)
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, unfused)


def test_gelu_epilogue_matches_torch():
    act, weight, codes_b, bias = _gemm_case(45, 40, 96, seed=7)
    config = GemmConfig(variant="tma", **SMALL)
    fused = quant_matmul_triton(act, weight, codes_b, bias, torch.bfloat16, config, epilogue=Epilogue("gelu_tanh"))
    unfused = apply_epilogue_torch(quant_matmul_triton(act, weight, codes_b, bias, torch.bfloat16, config),
                                   Epilogue("gelu_tanh"))
    # tanh differs from torch's in the last float32 bits: at most one bf16 rounding step, rarely
    assert max_rel_diff(fused, unfused) <= 8e-3 and float((fused != unfused).float().mean()) <= 0.02


def test_epilogue_refusals():
    with pytest.raises(ValueError, match="kind must be one of"):
        Epilogue("relu")
    with pytest.raises(ValueError, match="needs its residual"):
        Epilogue("residual")
    act, weight, codes_b, bias = _gemm_case(8, 16, 32, seed=8)
    with pytest.raises(ValueError, match=r"residual must be \[8, 16\]"):
        quant_matmul_triton(act, weight, codes_b, bias, epilogue=Epilogue("residual", torch.zeros(8, 8)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("K, n_targets, affine, modulate", [(5120, 3, False, True), (1536, 1, True, False),
                                                            (1920, 1, False, True)])
def test_norm_quant_model_widths_gpu(K, n_targets, affine, modulate):
    _check_norm_quant(2, 2048, K, affine, modulate, n_targets, h_tolerance=1e-3)
