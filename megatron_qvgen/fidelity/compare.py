"""Teacher and student sampled in lock step from the same noise and text.

At each sampler step the teacher moves along its trajectory, the student along its own, and the student
also predicts at the teacher's latent (the one-step error). Three forwards per step (two at the first,
where both latents are the noise); nothing of a trajectory is kept but the final samples of the first few
prompts, for the picture.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

from megatron_qvgen.fidelity.inputs import EvalInputs
from megatron_qvgen.fidelity.metrics import FidelityMeter

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Comparison:
    results: Dict
    teacher_samples: List[torch.Tensor] = field(default_factory=list)   # model layout, float32, CPU
    student_samples: List[torch.Tensor] = field(default_factory=list)


def _timesteps(t, batch: int, device) -> torch.Tensor:
    """Flow matching feeds float timesteps (1000 sigma), DDPM models integer ones, as in training."""
    return torch.full((batch,), t, dtype=torch.float32 if isinstance(t, float) else torch.long, device=device)


def _guided(model: Denoiser, x, t, text, empty, scale: float) -> torch.Tensor:
    """Classifier-free guidance (scale 1 = the conditional prediction alone)."""
    if scale == 1.0:
        return model(x, t, text)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([empty.expand_as(text), text]))
    uncond, cond = both.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def compare(teacher: Denoiser, student: Denoiser, inputs: EvalInputs, sampler, *, num_timestep_groups: int,
            batch_size: int = 4, guidance_scale: float = 1.0, keep: int = 4, device=None, progress=None
            ) -> Comparison:
    """Sample every prompt of ``inputs`` with both models (on ``device``); errors per ``metrics``."""
    timesteps = sampler.timesteps()
    meter = FidelityMeter(timesteps, num_timestep_groups)
    out = Comparison(results={})
    start = time.perf_counter()
    for indices, noise, text in inputs.batches(batch_size):
        noise, text = noise.to(device), text.to(device)
        x_t, x_s = noise.clone(), noise.clone()
        empty = inputs.empty_text.unsqueeze(0).to(device)
        for k, t in enumerate(timesteps):
            ts = _timesteps(t, len(indices), device)
            pred_t = _guided(teacher, x_t, ts, text, empty, guidance_scale)
            one_step = _guided(student, x_t, ts, text, empty, guidance_scale)
            pred_s = one_step if torch.equal(x_s, x_t) else _guided(student, x_s, ts, text, empty, guidance_scale)
            x_t = sampler.step(x_t, k, pred_t)
            x_s = sampler.step(x_s, k, pred_s)
            meter.add_step(k, x_s, x_t, one_step, pred_t)
            if progress is not None:
                progress()
        meter.add_final(x_s, x_t)
        for row, i in enumerate(indices):
            if i < keep:
                out.teacher_samples.append(x_t[row].cpu())
                out.student_samples.append(x_s[row].cpu())
    out.results = meter.results()
    out.results["seconds"] = time.perf_counter() - start
    return out


@torch.no_grad()
def sample(model: Denoiser, inputs: EvalInputs, sampler, *, batch_size: int = 4, guidance_scale: float = 1.0,
           device=None) -> List[torch.Tensor]:
    """One model alone: the final latent of every prompt (model layout, CPU)."""
    out: List[torch.Tensor] = []
    for indices, noise, text in inputs.batches(batch_size):
        x, text = noise.to(device), text.to(device)
        empty = inputs.empty_text.unsqueeze(0).to(device)
        for k, t in enumerate(sampler.timesteps()):
            ts = _timesteps(t, len(indices), device)
            x = sampler.step(x, k, _guided(model, x, ts, text, empty, guidance_scale))
        out.extend(x.cpu().unbind(0))
    return out
