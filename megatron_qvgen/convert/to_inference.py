"""Training checkpoint of the QAT student -> standalone inference folder (``qvgen_kernels.format``).

Per quantized linear the integer weight codes are computed with ``qvgen_kernels.codes`` from the
trained weight, scale and zero point exactly as the fake quantizer computed them, and packed two a
byte; the activation clip factors are the sigmoids of the trained logits, as the fake quantizer used
them. Everything else is stored in bf16 under its diffusers name. Tensors are read a layer at a time
from the dist checkpoint (any TP/PP it was saved at), without a process group.

A checkpoint whose auxiliary module has not decayed to rank 0 is refused, unless ``keep_aux``: then
the live factors are exported as a bf16 low-rank side branch with the rank-decay gamma of the
checkpoint's step folded into the left factor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from megatron_qvgen.config import ExperimentConfig
from megatron_qvgen.convert.checkpoint_io import checkpoint_shapes, read_tensors
from megatron_qvgen.convert.diffusers_io import diffusers_config_dict
from megatron_qvgen.convert.errors import ConversionError
from megatron_qvgen.convert.tables import table_for
from megatron_qvgen.dist_ckpt import is_complete, load_common
from megatron_qvgen.quant.rank_decay import RankDecaySchedule
from qvgen_kernels import codes
from qvgen_kernels.format import QuantizationConfig, QuantizedLinearExport, existing_export_files, write_export

QUANT_MARK = ".weight_quantizer.scale"


class AuxiliaryModuleNotDecayed(ConversionError):
    """The checkpoint still holds live auxiliary factors (rank > 0)."""


class ExportExists(ConversionError, FileExistsError):
    """The destination already holds an export and ``overwrite`` was not asked for."""


@dataclass
class InferenceExportSummary:
    destination: Path
    step: int
    quantized: int
    plain: int
    aux_rank: int


def resolve_checkpoint(src: str | os.PathLike) -> Path:
    """A training run directory (its ``latest``) or one ``iter_*`` checkpoint."""
    from megatron_qvgen.training.checkpointing import latest_checkpoint

    if not Path(src).exists():
        raise ConversionError(f"{src} does not exist")
    path = latest_checkpoint(str(src))
    if path is None:
        raise ConversionError(f"{src}: no complete training checkpoint (neither a checkpoint folder nor a run "
                              "directory with a 'latest' pointer)")
    return Path(path)


def _training_config(ckpt: Path) -> Tuple[ExperimentConfig, int]:
    common = load_common(str(ckpt)) or {}
    try:
        cfg = ExperimentConfig.from_dict(common["common"]["config"])
        return cfg, int(common["step"])
    except (KeyError, TypeError) as exc:
        raise ConversionError(f"{ckpt}: not a megatron-qvgen training checkpoint (no run config/step: {exc})") from None


def export_inference(src: str | os.PathLike, dst: str | os.PathLike, *, keep_aux: bool = False,
                     overwrite: bool = False, progress: bool = True) -> InferenceExportSummary:
    existing = () if overwrite else existing_export_files(dst)
    if existing:   # refused before the (long) quantization, not after it
        raise ExportExists(f"{dst} already holds an export ({', '.join(existing)}); add --overwrite to replace it "
                           "(overwrite=True from Python)")
    ckpt = resolve_checkpoint(src)
    cfg, step = _training_config(ckpt)
    stored = checkpoint_shapes(ckpt)
    model_keys = {k: v for k, v in stored.items() if not k.startswith(("optimizer", "rng_state"))}
    quantized = sorted(k[: -len(QUANT_MARK)] for k in model_keys if k.endswith(QUANT_MARK))
    if not quantized:
        raise ConversionError(f"{ckpt}: holds no quantized linears (a bf16 checkpoint? use megatron_to_diffusers)")
    aux_rank = _aux_rank(ckpt, model_keys, quantized)
    if aux_rank > 0 and not keep_aux:
        raise AuxiliaryModuleNotDecayed(
            f"{ckpt} (step {step}) still holds the auxiliary module at rank {aux_rank}: train until rank decay "
            "reaches 0, or export it as a bf16 low-rank side branch with --keep-aux")
    gamma = _gamma(cfg, step, aux_rank) if aux_rank > 0 else None
    q = cfg.quant
    linears: Dict[str, QuantizedLinearExport] = {}
    entries = {e.megatron: e.diffusers for e in table_for(cfg.model.arch).entries(cfg.model)}
    quant_suffixes = (".weight", ".bias", QUANT_MARK, ".weight_quantizer.zero_point", ".act_quantizer.clip_lower",
                      ".act_quantizer.clip_upper", ".aux_L", ".aux_R", ".aux_active_rank", ".quant_initialized")
    for name in tqdm(quantized, desc="quantize linears", unit="linear", disable=not progress):
        t = read_tensors(ckpt, {name + s: model_keys[name + s] for s in quant_suffixes if name + s in model_keys})
        if not bool(t[name + ".quant_initialized"]):
            raise ConversionError(f"{ckpt}: '{name}' was never initialised (PTQ step missing)")
        weight, scale, zero = t[name + ".weight"], t[name + QUANT_MARK].float(), t[name + ".weight_quantizer.zero_point"].float()
        aux_l = aux_r = None
        if gamma is not None and name + ".aux_L" in t:
            aux_l = t[name + ".aux_L"][:, :aux_rank].float() * gamma
            aux_r = t[name + ".aux_R"][:aux_rank].float()
        linears[_diffusers(entries, name)] = QuantizedLinearExport.from_codes(
            codes.weight_codes(weight, scale, zero, q.weight_bits), scale, zero,
            _clip_factors(t[name + ".act_quantizer.clip_lower"]), _clip_factors(t[name + ".act_quantizer.clip_upper"]),
            q.weight_bits, bias=t.get(name + ".bias"), aux_left=aux_l, aux_right=aux_r)
    in_linear = {name + s for name in quantized for s in quant_suffixes}
    plain_keys = {k: v for k, v in model_keys.items() if k not in in_linear}
    plain = {_diffusers(entries, k): v for k, v in read_tensors(ckpt, plain_keys).items()}
    quant_config = QuantizationConfig(weight_bits=q.weight_bits, act_bits=q.act_bits, act_clip_ratio=q.act_clip_ratio,
                                      num_timestep_groups=q.num_timestep_groups)
    written = write_export(dst, diffusers_config_dict(cfg.model), quant_config, linears, plain, overwrite=overwrite)
    return InferenceExportSummary(written, step, len(linears), len(plain), aux_rank)


def _clip_factors(logits: torch.Tensor) -> torch.Tensor:
    """sigmoid of the clip logits as the fake quantizer computed it: CPU and CUDA sigmoids can differ in the
    last bit, so on a machine with a GPU (where training ran) it is computed there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.sigmoid(logits.to(device).float()).cpu()


def _diffusers(entries: Dict[str, str], megatron_name: str) -> str:
    """diffusers name of a parameter or of a linear (by its weight's entry)."""
    if megatron_name in entries:
        return entries[megatron_name]
    weight = entries.get(megatron_name + ".weight")
    if weight is not None:
        return weight[: -len(".weight")]
    raise ConversionError(f"no diffusers name for checkpoint tensor {megatron_name!r}")


def _aux_rank(ckpt: Path, model_keys, quantized: List[str]) -> int:
    rank_keys = {n + ".aux_active_rank": model_keys[n + ".aux_active_rank"] for n in quantized
                 if n + ".aux_L" in model_keys and n + ".aux_active_rank" in model_keys}
    if not rank_keys:
        return 0
    ranks = {int(v) for v in read_tensors(ckpt, rank_keys).values()}
    if len(ranks) > 1:
        raise ConversionError(f"{ckpt}: auxiliary factors with mixed ranks {sorted(ranks)}")
    return ranks.pop()


def _gamma(cfg: ExperimentConfig, step: int, rank: int) -> torch.Tensor:
    """gamma the student used at ``step`` (the last completed step's gate) for a live rank ``rank``."""
    schedule = RankDecaySchedule(cfg.quant, cfg.decay_phase_steps)
    keep = cfg.quant.kept_rank(rank) if cfg.quant.rank_decay else rank
    gamma = torch.ones(rank)
    gamma[keep:] = schedule.gate_at(max(step - 1, 0))
    return gamma


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    return is_complete(str(path)) and (Path(path) / "common.pt").exists()
