"""QuantizedLinear: an exported linear computes the fake-quantized linear it came from, on either backend."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated

import pytest  # noqa: E402

from qvgen_kernels import codes  # noqa: E402
from qvgen_kernels.context import timestep_groups  # noqa: E402
from qvgen_kernels.format import QuantizationConfig, QuantizedLinearExport  # noqa: E402
from qvgen_kernels.linear import QuantizedLinear  # noqa: E402
from qvgen_kernels.triton_env import interpreter_active  # noqa: E402
from tests.numerics import assert_rel_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or interpreter_active()
GROUPS = 4


def _exported(out_f, in_f, bits, aux_rank=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
    scale, zero = codes.weight_qparams_from_range(0.9 * w.amin(1, keepdim=True), 0.9 * w.amax(1, keepdim=True), bits)
    aux = {}
    if aux_rank:
        aux = dict(aux_left=torch.randn(out_f, aux_rank, generator=gen) * 0.1,
                   aux_right=torch.randn(aux_rank, in_f, generator=gen) * 0.1)
    lin = QuantizedLinearExport.from_codes(
        codes.weight_codes(w, scale, zero, bits), scale, zero, torch.sigmoid(torch.randn(GROUPS, generator=gen) + 2),
        torch.sigmoid(torch.randn(GROUPS, generator=gen) + 2), bits, bias=torch.randn(out_f, generator=gen), **aux)
    config = QuantizationConfig(weight_bits=bits, act_bits=bits, act_clip_ratio=0.95, num_timestep_groups=GROUPS)
    return lin, config, (w, scale, zero)


def _fake_quant_reference(x, lin, w_params, groups, bits):
    """What the QAT model computes at r = 0, in float64: Qa(x) @ Qw(W).T + b, per-sample clip factors."""
    w, scale, zero = w_params
    w_hat = codes.weight_dequant(codes.weight_codes(w, scale, zero, bits), scale, zero).double()
    a_lo = lin.act_clip_lower[groups].reshape(-1, 1, 1)
    a_hi = lin.act_clip_upper[groups].reshape(-1, 1, 1)
    lo, hi = codes.act_clip_range(x.cpu().float(), 0.95, a_lo, a_hi)
    s, z = codes.act_qparams(lo, hi, bits)
    x_hat = codes.act_dequant(codes.act_codes(x.cpu().float(), s, z, bits), s, z).double()
    w_eff = w_hat
    if lin.aux_left is not None:
        w_eff = w_hat + lin.aux_left.double() @ lin.aux_right.double()
    return x_hat @ w_eff.T + lin.bias.double()


BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 3])
def test_matches_the_fake_quantized_linear(backend, bits):
    lin, config, w_params = _exported(24, 64, bits, seed=bits)
    module = QuantizedLinear.from_export(lin, config, device=DEVICE)
    module.backend = backend
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    groups = torch.tensor([1, 3])
    with timestep_groups(groups):
        y = module(x)
    assert y.shape == (2, 7, 24) and y.dtype == torch.float32
    # bias is stored in bf16: the reference uses the stored value
    assert_rel_close(y.cpu(), _fake_quant_reference(x, lin, w_params, groups, bits), rel=2e-6, what=backend)
    x16 = x.to(torch.bfloat16)
    with timestep_groups(groups):
        y16 = module(x16)
    assert y16.dtype == torch.bfloat16
    assert_rel_close(y16.cpu(), _fake_quant_reference(x16, lin, w_params, groups, bits), rel=8e-3, what="bf16 in/out")


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
def test_backends_and_residencies_agree():
    lin, config, _ = _exported(40, 96, 4, seed=5)
    module = QuantizedLinear.from_export(lin, config, device=DEVICE)
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    outs = {}
    with timestep_groups(torch.tensor([0, 2, 3])):
        for backend, residency in (("torch", "packed"), ("triton", "packed"), ("triton", "int8")):
            module.backend, module.weight_residency = backend, residency
            outs[backend, residency] = module(x)
    ref = outs["torch", "packed"]
    for key, y in outs.items():
        assert_rel_close(y, ref, rel=1e-6, what=str(key))


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the Triton interpreter")
def test_gemm_variant_picks_the_kernel():
    """``gemm_variant`` (``RuntimeTransformer.set_gemm``) swaps the GEMM kernel and nothing else; the Gluon one
    is refused where it cannot run, by name."""
    lin, config, _ = _exported(40, 96, 4, seed=5)
    module = QuantizedLinear.from_export(lin, config, device=DEVICE)
    module.backend = "triton"
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with timestep_groups(torch.tensor([1, 3])):
        ref = module(x)
        for variant in ("ptr", "tma", "tma_persistent"):
            module.gemm_variant = variant
            assert torch.equal(module(x), ref), variant
        module.gemm_variant = "gluon"
        if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
            assert torch.equal(module(x), ref)
        else:
            with pytest.raises(ValueError, match=r"variant=.gluon.*Hopper GPU \(sm_90\) only"):
                module(x)


def test_low_rank_side_branch_sees_quantized_input():
    lin, config, w_params = _exported(16, 32, 4, aux_rank=3, seed=7)
    module = QuantizedLinear.from_export(lin, config)
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(3))
    with timestep_groups(2):
        y = module(x)
    ref = _fake_quant_reference(x, lin, w_params, torch.tensor([2]), 4)
    assert_rel_close(y, ref, rel=2e-2, what="with side branch (bf16 factors)")


def test_timestep_groups_are_required_and_checked():
    lin, config, _ = _exported(8, 16, 4)
    module = QuantizedLinear.from_export(lin, config)
    x = torch.randn(2, 3, 16)
    with pytest.raises(RuntimeError, match="timestep_groups"):
        module(x)
    with timestep_groups([1, 2, 3]), pytest.raises(ValueError, match="3 timestep groups for a batch of 2"):
        module(x)
    with timestep_groups([1, GROUPS]), pytest.raises(ValueError, match="out of range"):
        module(x)
    with pytest.raises(ValueError, match=">= 0"):
        with timestep_groups(-1):
            pass
    with pytest.raises(ValueError, match="expects 16"):
        with timestep_groups(0):
            module(torch.randn(2, 8))


def test_state_dict_round_trip_recomputes_column_sums():
    lin, config, _ = _exported(8, 16, 4, seed=9)
    module = QuantizedLinear.from_export(lin, config)
    fresh = QuantizedLinear(16, 8, 4, 4, 0.95, GROUPS)
    fresh.load_state_dict(module.state_dict())
    assert "weight_colsum" not in module.state_dict()
    assert torch.equal(fresh.weight_colsum, module.weight_colsum) and int(module.weight_colsum.sum()) > 0
    x = torch.randn(4, 16)
    with timestep_groups(1):
        assert torch.equal(fresh(x), module(x))
