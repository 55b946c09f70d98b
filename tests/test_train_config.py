"""TrainConfig refuses values that megatron's scheduler would take silently and turn into another schedule."""
import pytest

from megatron_qvgen.config import ConfigError, TrainConfig


@pytest.mark.parametrize("field,value,message", [
    ("min_lr_ratio", 1.5, "train.min_lr_ratio must be in \\[0, 1\\]"),
    ("min_lr_ratio", -0.1, "train.min_lr_ratio must be in \\[0, 1\\]"),
    ("warmup_fraction", 1.0, "train.warmup_fraction must be in \\[0, 1\\)"),
    ("aux_lr", -1e-4, "train.aux_lr must be >= 0"),
])
def test_out_of_range_schedule_fields_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_constant_lr_after_warm_up_is_accepted():
    assert TrainConfig(min_lr_ratio=1.0).min_lr_ratio == 1.0
