"""The quantizers against a float64 reference written straight from QVGEN.md's formulas."""
import math

import pytest
import torch

from megatron_qvgen.config import QuantConfig
from megatron_qvgen.quant.activation_quantizer import ActivationQuantizer
from megatron_qvgen.quant.weight_quantizer import LSQPlusWeightQuantizer
from qvgen_kernels import codes


# ---------------------------------------------------------------- float64 references (QVGEN.md, literally)
def ref_weight_init(w, bits):
    """For p = 1.00, 0.99, ..., 0.21: [min, max] = p [rowmin, rowmax]; score sum |Q(W) - W|^2.4; keep the best."""
    w = w.double()
    qmax = 2 ** bits - 1
    out_s, out_z = [], []
    for row in w:
        best = (math.inf, None, None)
        for i in range(80):
            p = 1.0 - i / 100
            lo, hi = p * row.min(), p * row.max()
            s = max((hi - lo) / qmax, 1e-9)
            z = -lo / s
            q = torch.clamp(torch.round(row / s + z), 0, qmax)
            err = ((s * (q - z) - row).abs() ** 2.4).sum().item()
            if err < best[0]:
                best = (err, s, z)
        out_s.append(best[1])
        out_z.append(best[2])
    return torch.tensor(out_s, dtype=torch.float64).unsqueeze(1), torch.tensor(out_z, dtype=torch.float64).unsqueeze(1)


def ref_weight_codes(w, s, z, bits):
    return torch.clamp(torch.round(w.double() / s + z), 0, 2 ** bits - 1)


def ref_act_codes(x, lower_logit, upper_logit, bits, c=0.95):
    """min = rowmin c sigmoid(lower), max = rowmax c sigmoid(upper), s = (max-min)/qmax,
    z = clamp(-round(min/s)), q = clamp(round(x/s) + z)."""
    x = x.double()
    qmax = 2 ** bits - 1
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    lo = x.amin(-1, keepdim=True) * c * sig(lower_logit)
    hi = x.amax(-1, keepdim=True) * c * sig(upper_logit)
    s = ((hi - lo) / qmax).clamp_min(1e-9)
    z = torch.clamp(-torch.round(lo / s), 0, qmax)
    return torch.clamp(torch.round(x / s) + z, 0, qmax), s, z


@pytest.mark.parametrize("bits", [2, 3, 4])  # the weight widths QuantConfig accepts (WEIGHT_BITS)
def test_weight_quantizer_matches_float64_reference(bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 40) * torch.linspace(0.1, 3.0, 24).unsqueeze(1)
    w[3, 5] = 9.0  # an outlier row the clip search should shrink
    quant = QuantConfig(weight_bits=bits)
    wq = LSQPlusWeightQuantizer(24, 40, quant)
    wq.initialize(w)
    s_ref, z_ref = ref_weight_init(w, bits)
    torch.testing.assert_close(wq.scale.double(), s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(wq.zero_point.double(), z_ref, rtol=1e-5, atol=1e-5)
    ours = codes.weight_codes(w, wq.scale, wq.zero_point, bits)
    assert torch.equal(ours.double(), ref_weight_codes(w, wq.scale.double(), wq.zero_point.double(), bits))
    assert ours.min() >= 0 and ours.max() <= 2 ** bits - 1


def test_weight_quantizer_lsq_plus_gradients():
    """d w_hat/ds = q - z - w/s inside the range, q - z when clipped; d/dz = -s only when clipped; both x g."""
    torch.manual_seed(0)
    bits, in_features = 4, 16
    w = torch.randn(6, in_features)
    quant = QuantConfig(weight_bits=bits)
    wq = LSQPlusWeightQuantizer(6, in_features, quant)
    wq.initialize(w)
    with torch.no_grad():
        wq.scale.mul_(0.7)  # force some clipping
    w_param = w.clone().requires_grad_(True)
    out = wq(w_param)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    s, z = wq.scale.detach().double(), wq.zero_point.detach().double()
    raw = w.double() / s + z
    q = torch.clamp(torch.round(raw), 0, 15)
    inside = (torch.round(raw) >= 0) & (torch.round(raw) <= 15)
    g = 1.0 / math.sqrt(in_features * 15)
    ds = torch.where(inside, q - z - w.double() / s, q - z)
    dz = torch.where(inside, torch.zeros_like(q), -s.expand_as(q))
    torch.testing.assert_close(wq.scale.grad.double(), g * (ds * upstream).sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wq.zero_point.grad.double(), g * (dz * upstream).sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_param.grad, (upstream * inside).float())


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_activation_quantizer_matches_float64_reference(bits):
    torch.manual_seed(10 + bits)
    quant = QuantConfig(act_bits=bits)
    aq = ActivationQuantizer(quant)
    with torch.no_grad():
        aq.clip_lower.copy_(torch.randn(50))
        aq.clip_upper.copy_(torch.randn(50))
    x = torch.randn(7, 3, 32) * 4 + 0.5
    groups = torch.tensor([0, 17, 49])
    xhat = aq(x, groups)
    for b, g in enumerate(groups.tolist()):
        q_ref, s_ref, z_ref = ref_act_codes(x[:, b], aq.clip_lower[g].item(), aq.clip_upper[g].item(), bits)
        # the codes the quantizer used, recovered exactly from its output and the reference scale
        lo, hi = codes.act_clip_range(x[:, b], 0.95, torch.sigmoid(aq.clip_lower[g]), torch.sigmoid(aq.clip_upper[g]))
        s, z = codes.act_qparams(lo, hi, bits)
        q = codes.act_codes(x[:, b], s, z, bits)
        assert torch.equal(q.double(), q_ref), f"codes differ for group {g}"
        torch.testing.assert_close(s.double(), s_ref, rtol=1e-6, atol=0)
        assert torch.equal(z.double(), z_ref)
        torch.testing.assert_close(xhat[:, b].double(), (s * (q - z)).double(), rtol=0, atol=0)


def test_activation_quantizer_clip_gradients_reach_each_samples_group():
    quant = QuantConfig()
    aq = ActivationQuantizer(quant)
    x = torch.randn(5, 2, 16, requires_grad=True)
    aq(x, torch.tensor([3, 40])).square().sum().backward()
    touched = (aq.clip_upper.grad != 0).nonzero().flatten().tolist()
    assert touched == [3, 40]
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_codes_pack_roundtrip_and_timestep_groups():
    q = torch.randint(0, 16, (5, 9))
    packed = codes.pack_codes(q, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 5)
    assert torch.equal(codes.unpack_codes(packed, 9).long(), q)
    assert codes.timestep_group(torch.tensor([0, 49, 50, 999]), 50).tolist() == [0, 49, 0, 49]
    assert codes.timestep_group(torch.tensor([999.7, 50.2]), 50).tolist() == [49, 0]
    with pytest.raises(ValueError, match="bit width"):
        codes.qmax(9)
