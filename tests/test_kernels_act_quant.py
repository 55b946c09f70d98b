"""Kernel (a): per-token activation codes, scales, zero points and row sums bit-identical to codes.py.

Runs the Triton kernel in the interpreter on CPU (TRITON_INTERPRET=1) and compiled on a GPU; either way the
reference is codes.py on the same device.
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
from qvgen_kernels.act_quant import quantize_per_token_torch, scalar_division_uses_reciprocal  # noqa: E402
from qvgen_kernels.act_quant_triton import quantize_per_token_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _assert_identical(x, groups, rows_per_sample, lo, hi, clip_ratio, bits):
    got = quantize_per_token_triton(x, groups, rows_per_sample, lo, hi, clip_ratio, bits)
    ref = quantize_per_token_torch(x, groups, rows_per_sample, lo, hi, clip_ratio, bits)
    assert got.codes.dtype == torch.int8 and got.codes.shape == x.shape
    for field in ("codes", "scale", "zero", "rowsum"):
        a, b = getattr(got, field), getattr(ref, field)
        mismatch = (a != b).nonzero()
        assert mismatch.numel() == 0, f"{field} differs at {mismatch[:5].tolist()}: {a[tuple(mismatch[0])]} vs " \
                                      f"{b[tuple(mismatch[0])]}"
    return got


def _rows(n, k, dtype, gen):
    x = torch.randn(n, k, generator=gen) * torch.logspace(-3, 2, n)[:, None] + torch.randn(n, 1, generator=gen)
    x[0] = 0.0                                     # degenerate: the scale clamps to its epsilon
    x[1] = 0.37                                    # constant row
    x[2] = x[2].abs() + 1.0                        # all positive: zero point clamps to 0
    x[3] = -x[3].abs() - 1.0                       # all negative
    x[4, 5] = 1e4                                  # one outlier
    return x.to(dtype)


@pytest.mark.parametrize("k", [48, 192, 203, 1536, 1920, 2100])
@pytest.mark.parametrize("bits", [4, 3])
def test_codes_match_codes_py(k, bits):
    gen = torch.Generator().manual_seed(k + bits)
    batch, tokens, groups_total = 2, 5, 6
    lo = torch.sigmoid(torch.randn(groups_total, generator=gen))
    hi = torch.sigmoid(torch.randn(groups_total, generator=gen))
    lo[4], hi[4] = 1e-7, 2e-7                      # tiny clips: |x / s| beyond 2**22, codes saturate
    for dtype in (torch.bfloat16, torch.float32):
        x = _rows(batch * tokens, k, dtype, gen).to(DEVICE)
        for groups in ([3, 4], [0, 5]):
            _assert_identical(x, torch.tensor(groups, device=DEVICE), tokens, lo.to(DEVICE), hi.to(DEVICE), 0.95,
                              bits)


@pytest.mark.parametrize("bits", [4, 3])
def test_ties_round_half_to_even(bits):
    """A row spanning [-qmax/2, qmax/2] with clip factors 1 has scale 1: every half-integer is a tie."""
    top = codes.qmax(bits)
    halves = torch.arange(-top, top + 1, dtype=torch.float32) / 2         # -qmax/2 .. qmax/2 in steps of 0.5
    x = halves.repeat(3, 1).to(DEVICE)
    ones = torch.ones(1, device=DEVICE)
    got = _assert_identical(x, torch.zeros(1, dtype=torch.long, device=DEVICE), 3, ones, ones, 1.0, bits)
    assert got.scale[0].item() == 1.0
    expected = torch.clamp(torch.round(halves) + torch.round(torch.tensor(top / 2)), 0, top)
    assert torch.equal(got.codes[0].float().cpu(), expected)


@pytest.mark.parametrize("bits", [4, 3])
def test_quotients_next_to_rounding_ties(bits):
    """Elements x = RN(h * s) and their float neighbours for every half-integer h in the row's range: the
    kernel's division must land on the same side of each tie as torch's (a one-ulp error flips a code)."""
    gen = torch.Generator().manual_seed(bits)
    rows = []
    for _ in range(8):
        lo_end, hi_end = -(torch.rand(1, generator=gen) * 3 + 0.1), torch.rand(1, generator=gen) * 3 + 0.1
        s, _ = codes.act_qparams(lo_end.to(DEVICE), hi_end.to(DEVICE), bits)     # the scale codes.py will find
        halves = torch.arange(-2 * codes.qmax(bits), 2 * codes.qmax(bits) + 1, device=DEVICE) / 2
        ties = halves * s
        ties = ties[(ties > lo_end.to(DEVICE)) & (ties < hi_end.to(DEVICE))]
        near = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
        row = torch.cat([lo_end.to(DEVICE), hi_end.to(DEVICE), near])
        rows.append(torch.nn.functional.pad(row, (0, 160 - row.numel()), value=float(lo_end)))
    x = torch.stack(rows)
    one = torch.ones(1, device=DEVICE)
    _assert_identical(x, torch.zeros(1, dtype=torch.long, device=DEVICE), 8, one, one, 1.0, bits)


def test_fp8_codes_hold_the_same_values():
    gen = torch.Generator().manual_seed(7)
    x = _rows(6, 64, torch.bfloat16, gen).to(DEVICE)
    g, clip = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.full((1,), 0.9, device=DEVICE)
    a = quantize_per_token_triton(x, g, 6, clip, clip, 0.95, 4, codes_dtype=torch.float8_e4m3fn)
    b = quantize_per_token_torch(x, g, 6, clip, clip, 0.95, 4)
    assert a.codes.dtype == torch.float8_e4m3fn and torch.equal(a.codes.float(), b.codes.float())


def test_rejects_bad_arguments():
    x = torch.randn(4, 8, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="do not split into samples"):
        quantize_per_token_triton(x, torch.zeros(3, dtype=torch.long), 3, one, one, 0.95, 4)
    with pytest.raises(ValueError, match="do not fit int8"):
        quantize_per_token_triton(x, torch.zeros(1, dtype=torch.long), 4, one, one, 0.95, 8)
    with pytest.raises(ValueError, match="contiguous rows"):
        quantize_per_token_triton(x.T, torch.zeros(1, dtype=torch.long), 8, one, one, 0.95, 4)


def test_scalar_division_probe_on_cpu():
    """torch's CPU kernel divides by a Python scalar (the kernel then uses div_rn, not a reciprocal)."""
    assert scalar_division_uses_reciprocal("cpu") is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")  # also without the conftest
def test_codes_match_codes_py_on_gpu_at_model_width():
    gen = torch.Generator().manual_seed(0)
    lo = torch.sigmoid(torch.randn(50, generator=gen)).cuda()
    hi = torch.sigmoid(torch.randn(50, generator=gen)).cuda()
    for k in (1536, 5120, 13824):
        magnitude = 10.0 ** (torch.rand(2 * 2048, 1, generator=gen) * 60 - 30)     # rows from 1e-30 to 1e30
        magnitude[:2048] = 3.0
        x = (torch.randn(2 * 2048, k, generator=gen) * magnitude).to(torch.bfloat16).cuda()
        _assert_identical(x, torch.tensor([7, 49], device="cuda"), 2048, lo, hi, 0.95, 4)
        _assert_identical(x, torch.tensor([0, 13], device="cuda"), 2048, lo, hi, 0.95, 3)
