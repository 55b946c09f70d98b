"""One evaluation from start to finish: resolve the student, load both models at TP = 1, sample, report."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch

from megatron_qvgen.fidelity import report
from megatron_qvgen.fidelity.compare import compare
from megatron_qvgen.fidelity.errors import EvaluationError
from megatron_qvgen.fidelity.inputs import load_inputs
from megatron_qvgen.fidelity.sampler import sampler_for
from megatron_qvgen.fidelity.students import run_settings, load_student, load_teacher, resolve_student, run_config


@dataclasses.dataclass
class EvalOptions:
    samples: int = 8
    sampling_steps: int = 20
    seed: int = 0
    batch_size: int = 4
    guidance_scale: float = 1.0
    attention: Optional[str] = None
    grid_samples: int = 4

    def __post_init__(self):
        if self.samples < 1 or self.sampling_steps < 1 or self.batch_size < 1:
            raise EvaluationError(f"--samples, --sampling-steps and --batch-size must be >= 1 "
                                  f"(got {self.samples}, {self.sampling_steps}, {self.batch_size})")
        if self.seed < 0:
            raise EvaluationError(f"--seed must be >= 0, got {self.seed}")
        if self.guidance_scale < 1.0:
            raise EvaluationError(f"--guidance-scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")


def evaluate(teacher: str, student: str, json_path: str, options: EvalOptions, recipe: Optional[str] = None,
             overrides: Sequence[Tuple[str, str]] = (), quiet: bool = False) -> Dict:
    """Checks the inputs before anything heavy, runs the comparison, writes JSON + PNG, returns the record."""
    from megatron_qvgen.fidelity.session import close_single_process, open_single_process

    if not os.path.isdir(teacher):
        raise EvaluationError(f"teacher {teacher}: no such checkpoint folder")
    source = resolve_student(student)
    cfg = run_config(source, recipe, overrides)
    info = open_single_process(seed=options.seed)
    try:
        teacher_model = load_teacher(teacher, cfg)
        student_model = load_student(source, cfg, teacher_model, options.attention)
        result, inputs, sampler = measure(teacher_model, student_model, cfg, options, info.device,
                                          keep=options.grid_samples)
    finally:
        close_single_process()
    record = dict(result.results)
    record.update({
        "teacher": os.path.abspath(teacher), "student": student, "student_kind": source.kind,
        "student_path": str(source.path) if source.path else None, "sampler": sampler.name,
        "guidance_scale": options.guidance_scale, "seed": options.seed, "device": str(info.device),
        "captions": inputs.captions, "config": run_settings(cfg),
    })
    if result.teacher_samples and not report.can_draw():
        print("no PNG grid: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    elif result.teacher_samples:
        png = report.grid_path(json_path)
        title = (f"{source.describe()} vs teacher: rel_l2 {record['rel_l2']:.4f}, PSNR {record['psnr_db']:.2f} dB "
                 f"({record['samples']} samples, {record['sampling_steps']} {sampler.name} steps)")
        columns = [("teacher", [inputs.stored_layout(x) for x in result.teacher_samples]),
                   ("student", [inputs.stored_layout(x) for x in result.student_samples])]
        report.save_grid(png, columns, inputs.captions, inputs.latent_source, title)
        record["grid_png"] = os.path.abspath(png)
    report.write_json(json_path, record)
    if not quiet:
        print(report.summary_table(record))
        print(f"wrote {json_path}" + (f" and {record['grid_png']}" if "grid_png" in record else ""))
    return record


def measure(teacher_model, student_model, cfg, options: EvalOptions, device: torch.device, keep: int = 0):
    """Sample both models on the run's prompts; also used on models already in memory (the study evaluates
    right after training). Returns (Comparison, EvalInputs, sampler)."""
    inputs = load_inputs(cfg, options.samples, options.seed)
    sampler = sampler_for(cfg, options.sampling_steps)
    groups = getattr(student_model, "num_timestep_groups", None) or cfg.quant.num_timestep_groups
    result = compare(teacher_model, student_model, inputs, sampler, num_timestep_groups=groups,
                     batch_size=options.batch_size, guidance_scale=options.guidance_scale, keep=keep, device=device)
    return result, inputs, sampler
