"""The bit widths QuantConfig accepts are exactly those that train, export and run in qvgen_kernels."""
import pytest
import torch

from megatron_qvgen.config import ConfigError, QuantConfig, apply_overrides
from megatron_qvgen.config.quant import ACT_BITS, BIT_PRESETS, WEIGHT_BITS
from megatron_qvgen.recipes import get_recipe, recipe_names
from qvgen_kernels import codes
from qvgen_kernels.format import ExportFormatError, QuantizationConfig
from qvgen_kernels.linear import QuantizedLinear


@pytest.mark.parametrize("bits", [1, 5, 6, 8, 4.0, True])
def test_weight_bits_the_export_cannot_hold_are_refused_naming_the_field(bits):
    with pytest.raises(ConfigError, match=r"quant\.weight_bits must be one of 2, 3, 4"):
        QuantConfig(weight_bits=bits)


@pytest.mark.parametrize("bits", [1, 9])
def test_act_bits_out_of_range_are_refused(bits):
    with pytest.raises(ConfigError, match=r"quant\.act_bits must be an integer in \[2, 8\]"):
        QuantConfig(act_bits=bits)


def test_command_line_override_goes_through_the_same_check():
    with pytest.raises(ConfigError, match="weight_bits"):
        apply_overrides(get_recipe("tiny_wan"), [("quant.weight_bits", "5")])
    assert apply_overrides(get_recipe("tiny_wan"), [("quant.weight_bits", "3")]).quant.weight_bits == 3


def test_accepted_widths_are_the_runtime_s():
    for w in WEIGHT_BITS:
        for a in ACT_BITS:
            QuantizationConfig(weight_bits=w, act_bits=a, act_clip_ratio=0.95, num_timestep_groups=2)
            layer = QuantizedLinear(8, 4, w, a, 0.95, 2)
            assert layer.weight_codes.dtype == torch.uint8
    with pytest.raises(ExportFormatError, match="weight_bits"):
        QuantizationConfig(weight_bits=max(WEIGHT_BITS) + 1, act_bits=4, act_clip_ratio=0.95, num_timestep_groups=2)
    with pytest.raises(ValueError):
        codes.check_bits(max(ACT_BITS) + 1)
    assert min(WEIGHT_BITS) == min(ACT_BITS) == codes.MIN_BITS and max(ACT_BITS) == codes.MAX_BITS


def test_every_preset_and_recipe_uses_a_supported_width():
    for name, (w, a) in BIT_PRESETS.items():
        assert w in WEIGHT_BITS and a in ACT_BITS, name
    for name in recipe_names():
        q = get_recipe(name).quant
        assert q.weight_bits in WEIGHT_BITS and q.act_bits in ACT_BITS, name
