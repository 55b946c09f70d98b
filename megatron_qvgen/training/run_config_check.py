"""A resumed run continues the run its checkpoint belongs to, or it is refused before anything is written.

The checkpoint's common state holds the whole run config it was trained with (``Trainer.save``). On resume it
is compared with the config of the new command line:

- the model, the quantization (bits, method, groups, rank, ...), the data stream the saved data position
  indexes (seed, split, resampling, epoch size, synthetic set) and the precision of the parameters are what
  the checkpoint *is*: any change is refused, one line naming each changed field, because loading the
  tensors would succeed and silently train something else (a W4 student resumed as W3);
- the parallel layout (TP / PP / DP, distributed optimizer) may change: checkpoints reshard;
- ``train.steps`` may grow (or shrink while still ahead of the checkpoint): the learning-rate schedule is
  the new config's, at the checkpoint's position (:func:`megatron_qvgen.training.checkpointing.restore_schedule`);
- the rank-decay phase length T (``quant.decay_phase_steps``, or derived from ``train.steps``) may change
  only while the checkpoint is in the same phase under both lengths: the factors' rank at the checkpoint
  is the number of boundaries already passed, and a schedule that places the checkpoint in another phase
  would ask to lower a rank that is already lower (or to raise it). When T is derived and the phase would
  move, T stays the checkpoint's (said in the log): decay ends where it was planned and the added steps
  train the model at rank 0. An explicit ``quant.decay_phase_steps`` that would move the phase is refused;
- everything else (learning rates, what rank decay does to the optimizer's moments, intervals, directories,
  logging) is the new command line's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from megatron_qvgen.config import ConfigError, ExperimentConfig

# Fields of the run that the checkpoint embodies; "section." alone means every field of that section.
FIXED_FIELDS = (
    "model.",
    "quant.",
    "data.seed", "data.split", "data.resample", "data.samples_per_epoch",
    "data.synthetic_latent_size", "data.synthetic_samples", "data.synthetic_samples_per_shard",
    "data.synthetic_seed",
    "train.precision",
)
# Judged by its effect (the phase at the checkpoint), not by its value: see the module docstring.
PHASE_FIELD = "quant.decay_phase_steps"
# Quantization fields that say how the optimizer is driven, not what the checkpoint is: free to change.
FREE_FIELDS = ("quant.decay_moments",)


class RunConfigMismatch(ConfigError):
    """The command line asks a run directory's checkpoint to become another run."""


@dataclass
class ResumePlan:
    cfg: ExperimentConfig             # the config to run (T pinned to the checkpoint's when needed)
    complete: bool = False            # the checkpoint is at or past train.steps: nothing to do
    notes: List[str] = field(default_factory=list)   # what carries over differently, for the log


def flatten_config(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A config dict (``cfg.to_dict()``, or as stored in a checkpoint or a JSON record) as ``{"section.field":
    value}``, tuples as lists, so that configs from any of those compare equal field by field."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _is_fixed(name: str) -> bool:
    if name == PHASE_FIELD or name in FREE_FIELDS:
        return False
    return any(name == f or (f.endswith(".") and name.startswith(f)) for f in FIXED_FIELDS)


def changed_fixed_fields(stored: Dict[str, Any], cfg: ExperimentConfig, also: Tuple[str, ...] = ()
                         ) -> Dict[str, tuple]:
    """``{field: (checkpoint value, new value)}`` for every fixed field (and every field named in ``also``) that
    differs (fields known to both)."""
    old, new = flatten_config(stored), flatten_config(cfg.to_dict())
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if (_is_fixed(k) or k in also) and old[k] != new[k]}


def _phase(cfg: ExperimentConfig, phase_steps: int, steps_done: int) -> int:
    """The rank-decay phase the factors of a checkpoint after ``steps_done`` steps are in."""
    from megatron_qvgen.quant.rank_decay import RankDecaySchedule

    if steps_done <= 0:
        return 0
    return RankDecaySchedule(cfg.quant, phase_steps).phase(steps_done - 1)


def _stored_phase_steps(stored: Dict[str, Any], cfg: ExperimentConfig) -> int:
    """T of the run that wrote the checkpoint (explicit, or derived from its train.steps as the config does)."""
    explicit = stored.get("quant", {}).get("decay_phase_steps")
    if explicit is not None:
        return int(explicit)
    old_steps = int(stored.get("train", {}).get("steps", cfg.train.steps))
    return max(1, (old_steps - 1) // max(1, cfg.quant.num_decay_phases))


def _with_phase_steps(cfg: ExperimentConfig, phase_steps: int) -> ExperimentConfig:
    return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, decay_phase_steps=phase_steps))


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def plan_resume(stored: Optional[Dict[str, Any]], cfg: ExperimentConfig, step: int, checkpoint: str,
                own: bool) -> ResumePlan:
    """Check the new ``cfg`` against the ``stored`` config of ``checkpoint`` (after ``step`` steps).

    ``own``: the checkpoint is this run directory's (else it comes from train.load_dir). Raises
    :class:`RunConfigMismatch` naming every refused change; returns what to run otherwise."""
    where = f"checkpoint {checkpoint} (step {step})"
    if stored is None:
        return ResumePlan(cfg, complete=step >= cfg.train.steps,
                          notes=[f"{where} records no run config: its settings cannot be checked"])
    changes = changed_fixed_fields(stored, cfg)
    plan = ResumePlan(cfg)
    if cfg.quant.has_aux and cfg.quant.rank_decay:
        old_t, new_t = _stored_phase_steps(stored, cfg), cfg.decay_phase_steps
        if old_t != new_t:
            old_phase, new_phase = _phase(cfg, old_t, step), _phase(cfg, new_t, step)
            if old_phase == new_phase:
                plan.notes.append(f"rank-decay phases now last {new_t} steps (were {old_t}); the checkpoint "
                                  f"stays in phase {old_phase + 1}")
            elif cfg.quant.decay_phase_steps is not None:
                changes[PHASE_FIELD] = (old_t, new_t)
            else:
                try:
                    plan.cfg = _with_phase_steps(cfg, old_t)
                except ConfigError as exc:
                    raise RunConfigMismatch(f"{where}: its rank-decay phases of {old_t} steps do not fit "
                                            f"train.steps={cfg.train.steps}: {exc}") from None
                end = old_t * cfg.quant.num_decay_phases
                plan.notes.append(
                    f"rank-decay phases keep T = {old_t} steps (train.steps {stored.get('train', {}).get('steps')} "
                    f"-> {cfg.train.steps} would make T = {new_t} and move the checkpoint from phase "
                    f"{old_phase + 1} to phase {new_phase + 1}); the auxiliary module is gone at step {end}"
                    + (f" and steps {end + 1}-{cfg.train.steps} train at rank 0" if end < cfg.train.steps else ""))
    if changes:
        listed = ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items())
        if own:
            how = ("a run continues with the model, quantization and data it started with; to train the new "
                   "settings start a new run with another --train.save_dir")
        else:
            how = ("train.load_dir continues the run that wrote it; to train the new settings start from the "
                   "full-precision weights (--init-from) with another --train.save_dir")
        if PHASE_FIELD in changes:
            how += (" (quant.decay_phase_steps may change only while the checkpoint stays in the same "
                    "rank-decay phase)")
        raise RunConfigMismatch(f"{where} was trained with other settings: {listed}. {how}")
    old_steps = stored.get("train", {}).get("steps")
    if old_steps is not None and old_steps != cfg.train.steps and step < cfg.train.steps:
        plan.notes.append(f"train.steps {old_steps} -> {cfg.train.steps}: the learning-rate schedule follows "
                          f"{cfg.train.steps} steps from step {step}")
    plan.complete = step >= plan.cfg.train.steps
    return plan
