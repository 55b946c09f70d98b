"""A whole run: model, quantization, parallel layout, data and training, checked together."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict

from megatron_qvgen.config.data import DataConfig
from megatron_qvgen.config.errors import ConfigError
from megatron_qvgen.config.model import ModelConfig, WanConfig, check_model_parallel, model_config_from_dict
from megatron_qvgen.config.parallel import ParallelConfig
from megatron_qvgen.config.quant import QuantConfig
from megatron_qvgen.config.train import TrainConfig


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=WanConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        p = self.parallel
        check_model_parallel(self.model, p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline)
        q = self.quant
        if q.has_aux and q.rank_decay:
            phases = q.num_decay_phases
            if self.train.steps <= phases:
                raise ConfigError(f"train.steps={self.train.steps} leaves no room for the {phases} rank-decay "
                                  "phases and a step at rank 0")
            if self.decay_phase_steps * phases >= self.train.steps:
                raise ConfigError(
                    f"rank decay removes the auxiliary module at step quant.decay_phase_steps x phases = "
                    f"{self.decay_phase_steps} x {phases} = {self.decay_phase_steps * phases}, which must be < "
                    f"train.steps={self.train.steps}: the auxiliary module must be gone before training ends")

    @property
    def decay_phase_steps(self) -> int:
        """Phase length T: quant.decay_phase_steps, or (train.steps - 1) // phases when that is None (the
        last step then runs without the auxiliary module, as in the published runs: 2667 steps, T = 444)."""
        q = self.quant
        if q.decay_phase_steps is not None:
            return q.decay_phase_steps
        return max(1, (self.train.steps - 1) // max(1, q.num_decay_phases))

    @property
    def objective(self) -> str:
        """Wan: flow matching (velocity). CogVideoX: v-prediction with zero terminal SNR."""
        return "flow_matching" if self.model.arch == "wan" else "v_prediction"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ExperimentConfig":
        d = dict(d)
        model = d.pop("model")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown)}")
        sections = {
            "quant": QuantConfig, "parallel": ParallelConfig, "data": DataConfig, "train": TrainConfig,
        }
        kwargs = {"name": d.get("name", "experiment")}
        for key, klass in sections.items():
            if key in d:
                kwargs[key] = _build(klass, d[key], key)
        model_cfg = model if not isinstance(model, dict) else _build_model(model)
        return cls(model=model_cfg, **kwargs)


def _build(klass, values: Dict[str, Any], section: str):
    names = {f.name for f in dataclasses.fields(klass) if f.init}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown fields in {section}: {sorted(unknown)}; known: {sorted(names)}")
    return klass(**values)


def _build_model(values: Dict[str, Any]):
    values = dict(values)
    arch = values.pop("arch", "wan")
    try:
        return model_config_from_dict(arch, values)
    except TypeError as exc:
        raise ConfigError(f"bad model fields for arch {arch!r}: {exc}") from None
