"""The models an evaluation compares, each wrapped as a denoiser ``(x, timestep, text) -> prediction``.

Teacher: a megatron checkpoint of the full-precision model (what ``fit_teacher`` or
``tools/convert/diffusers_to_megatron.py`` writes), loaded at TP = 1 whatever layout it was saved at.
Students, by what the user hands over:
- ``ptq``: the teacher quantized by the run's initialisation alone (the recipe's quant config and
  overrides: MSE clip search of every weight quantizer; no auxiliary module; no training);
- a training run folder (its ``latest``) or one ``iter_*`` checkpoint: the QAT student with the config it
  was trained with (a live auxiliary module runs with the rank-decay gate of its last step);
- an inference export folder: the standalone runtime (``qvgen_kernels.runtime.load_transformer``), as a
  deployment would run it.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from megatron_qvgen.config import ConfigError, ExperimentConfig, apply_overrides
from megatron_qvgen.fidelity.errors import EvaluationError
from megatron_qvgen.fidelity.session import SINGLE

PTQ = "ptq"


@dataclass(frozen=True)
class StudentSource:
    kind: str                  # "ptq" | "checkpoint" | "export"
    given: str                 # what the user typed
    path: Optional[Path] = None

    def describe(self) -> str:
        return PTQ if self.kind == PTQ else f"{self.kind} {self.path}"


# ---------------------------------------------------------------------------------------- what was given
def resolve_student(arg: str) -> StudentSource:
    """``ptq``, an export folder, a run folder (its ``latest``) or one checkpoint; one-line errors otherwise."""
    from qvgen_kernels.format import CONFIG_FILE, QUANT_CONFIG_FILE

    from megatron_qvgen.dist_ckpt import CheckpointError
    from megatron_qvgen.training.checkpointing import latest_checkpoint

    if arg == PTQ:
        return StudentSource(PTQ, arg)
    path = Path(arg)
    if not path.exists():
        raise EvaluationError(f"student {arg}: no such file or folder (expected 'ptq', a training run folder, an "
                              "iter_* checkpoint or an inference export folder)")
    if (path / QUANT_CONFIG_FILE).is_file() or (path / CONFIG_FILE).is_file():
        return StudentSource("export", arg, path)
    try:
        ckpt = latest_checkpoint(str(path))
    except CheckpointError as exc:
        raise EvaluationError(f"student {arg}: {exc}") from None
    if ckpt is None:
        raise EvaluationError(f"student {arg}: not a training run folder (no 'latest'), a complete iter_* "
                              "checkpoint, nor an inference export folder (no config.json)")
    return StudentSource("checkpoint", arg, Path(ckpt))


def run_config(source: StudentSource, recipe: Optional[str], overrides: Sequence[Tuple[str, str]]
               ) -> ExperimentConfig:
    """The config the evaluation follows: the student checkpoint's own, else the recipe's; then overrides."""
    from megatron_qvgen.recipes import get_recipe

    try:
        if source.kind == "checkpoint":
            cfg = _checkpoint_config(source.path)
        elif recipe is None:
            raise EvaluationError(f"a {source.kind} student records no training config: name the run's recipe "
                                  "with --recipe")
        else:
            cfg = get_recipe(recipe)
        return apply_overrides(cfg, overrides)
    except ConfigError as exc:
        raise EvaluationError(f"config: {exc}") from None


def _checkpoint_config(ckpt: Path) -> ExperimentConfig:
    from megatron_qvgen.dist_ckpt import load_common

    common = load_common(str(ckpt)) or {}
    try:
        return ExperimentConfig.from_dict(common["common"]["config"])
    except (KeyError, TypeError):
        raise EvaluationError(f"student {ckpt}: a megatron checkpoint without a training config (a full-precision "
                              "model? the teacher goes to --teacher)") from None


# ---------------------------------------------------------------------------------------- denoisers
class MegatronDenoiser:
    """A megatron model chunk at TP = PP = 1 in eval mode; ``gate`` is the rank-decay gate of a live Φ."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, num_timestep_groups: Optional[int],
                 gate: float = 1.0):
        self.model = model.eval()
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.num_timestep_groups = num_timestep_groups
        self.gate = gate

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        from megatron_qvgen.quant.context import quant_context

        with quant_context(aux_gate=self.gate):
            out = self.model(x.to(self.device, self.dtype), timestep.to(self.device), text.to(self.device, self.dtype))
        return out.float()


class RuntimeDenoiser:
    """An inference export in the standalone runtime (its own dtype, bf16 as exported)."""

    def __init__(self, runtime: torch.nn.Module):
        self.runtime = runtime.eval()
        self.num_timestep_groups = runtime.timestep_group_count()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        # by keyword: diffusers' Wan takes (x, timestep, text), CogVideoX (x, text, timestep)
        out = rt(hidden_states=x.to(rt.device, rt.dtype), timestep=timestep.to(rt.device),
                 encoder_hidden_states=text.to(rt.device, rt.dtype), return_dict=False)
        return out[0].float()


def _dtype(cfg: ExperimentConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def _build(cfg: ExperimentConfig, spec: str, quant=None) -> torch.nn.Module:
    from megatron_qvgen.models import build_model_chunks

    return build_model_chunks(cfg.model, SINGLE, spec=spec, quant=quant, params_dtype=_dtype(cfg))[0]


def load_teacher(path: str, cfg: ExperimentConfig) -> MegatronDenoiser:
    """The full-precision model at TP = 1; its recorded model config must be the run's."""
    from megatron_qvgen.config.model import architecture_differences
    from megatron_qvgen.convert.checkpoint_io import CONTENT_KEY, load_model, read_model_config
    from megatron_qvgen.convert.errors import ConversionError
    from megatron_qvgen.dist_ckpt import CheckpointError, load_common

    if not os.path.isdir(path):
        raise EvaluationError(f"teacher {path}: no such checkpoint folder")
    try:
        recorded = CONTENT_KEY in (load_common(path) or {})
        differences = architecture_differences(read_model_config(path), cfg.model) if recorded else {}
        if differences:
            diffs = ", ".join(f"{k} {theirs!r} vs {ours!r}" for k, (theirs, ours) in differences.items())
            raise EvaluationError(f"teacher {path} holds another model than the run's config ({diffs})")
        model = _build(cfg, "bf16")
        load_model([model], path, cfg.model if recorded else None)
    except (CheckpointError, ConversionError) as exc:
        raise EvaluationError(f"teacher {path}: {_one_line(exc)}") from None
    return MegatronDenoiser(model, _dtype(cfg), None)


def ptq_quant_config(cfg: ExperimentConfig):
    """The run's quantizers as initialised at step 0, without the auxiliary module."""
    return cfg.quant.with_(aux_rank=0, rank_decay=False)


def load_student(source: StudentSource, cfg: ExperimentConfig, teacher: MegatronDenoiser,
                 attention: Optional[str] = None):
    if source.kind == PTQ:
        return ptq_student(cfg, teacher)
    if source.kind == "checkpoint":
        return _checkpoint_student(source.path, cfg)
    return _export_student(source.path, cfg, attention)


@torch.no_grad()
def ptq_student(cfg: ExperimentConfig, teacher: MegatronDenoiser) -> MegatronDenoiser:
    from megatron_qvgen.quant import initialize_quantizers

    quant = ptq_quant_config(cfg)
    model = _build(cfg, "qat", quant)
    result = model.load_state_dict(teacher.model.state_dict(), strict=False)
    if result.unexpected_keys:
        raise EvaluationError(f"teacher tensors with no student counterpart: {result.unexpected_keys[:5]}")
    initialize_quantizers(model)
    return MegatronDenoiser(model, _dtype(cfg), quant.num_timestep_groups)


def _checkpoint_student(ckpt: Path, cfg: ExperimentConfig) -> MegatronDenoiser:
    from megatron_qvgen.dist_ckpt import CheckpointError, load_common, load_sharded
    from megatron_qvgen.quant.rank_decay import RankDecay, RankDecaySchedule
    from megatron_qvgen.training.checkpointing import holds_aux_factors

    model = _build(cfg, "qat", cfg.quant)
    schedule = RankDecaySchedule(cfg.quant, cfg.decay_phase_steps)
    live_aux = holds_aux_factors(str(ckpt))
    RankDecay(model, schedule).restore(live_aux)
    try:
        model.load_state_dict(load_sharded({"model": model.sharded_state_dict()}, str(ckpt))["model"])
        step = int(load_common(str(ckpt)).get("step", 0))
    except CheckpointError as exc:
        raise EvaluationError(f"student {ckpt}: {_one_line(exc)}") from None
    gate = schedule.gate_at(max(step - 1, 0)) if live_aux else 1.0  # the gate its last step trained with
    return MegatronDenoiser(model, _dtype(cfg), cfg.quant.num_timestep_groups, gate=gate)


def _export_student(folder: Path, cfg: ExperimentConfig, attention: Optional[str]) -> RuntimeDenoiser:
    from qvgen_kernels.format import ExportFormatError
    from qvgen_kernels.runtime import load_transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {}
    if attention is not None:
        if "attention" not in inspect.signature(load_transformer).parameters:
            raise EvaluationError(f"--attention {attention}: this qvgen_kernels runtime offers no attention choice")
        kwargs["attention"] = attention
    try:
        runtime = load_transformer(folder, device=device, **kwargs)
    except (ExportFormatError, FileNotFoundError, ValueError) as exc:
        raise EvaluationError(f"student {folder}: {_one_line(exc)}") from None
    expected = "WanTransformer3DModel" if cfg.model.arch == "wan" else "CogVideoXTransformer3DModel"
    if type(runtime).CLASS_NAME != expected:
        raise EvaluationError(f"student {folder} is a {type(runtime).CLASS_NAME}, the teacher a {expected}")
    return RuntimeDenoiser(runtime)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def run_settings(cfg: ExperimentConfig) -> dict:
    """The settings that decide the sampling, for the JSON record."""
    return {"arch": cfg.model.arch, "flow_shift": cfg.train.flow_shift, "snr_shift_scale": cfg.train.snr_shift_scale,
            "precision": cfg.train.precision, "quant": dataclasses.asdict(cfg.quant), "data": cfg.data.shards}
