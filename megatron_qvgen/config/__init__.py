"""Dataclass configs, one file per area, validated at construction (ConfigError names the field)."""
from megatron_qvgen.config.data import DataConfig
from megatron_qvgen.config.errors import ConfigError
from megatron_qvgen.config.experiment import ExperimentConfig
from megatron_qvgen.config.model import CogVideoXConfig, ModelConfig, WanConfig, check_model_parallel
from megatron_qvgen.config.overrides import apply_overrides, parse_override_args
from megatron_qvgen.config.parallel import ParallelConfig
from megatron_qvgen.config.quant import QuantConfig
from megatron_qvgen.config.train import TrainConfig

__all__ = [
    "CogVideoXConfig", "ConfigError", "DataConfig", "ExperimentConfig", "ModelConfig", "ParallelConfig",
    "QuantConfig", "TrainConfig", "WanConfig", "apply_overrides", "check_model_parallel", "parse_override_args",
]
