"""What the evaluation measures, accumulated batch by batch so that no trajectory is ever held in memory.

- ``rel_l2``: ||x_S - x_T|| / ||x_T|| over all samples' final latents together (the teacher's sample is
  the reference; 0 = identical, 1 = as far off as the sample is large).
- ``psnr_db``: 10 log10(peak^2 / MSE) of the final latents, peak = the teacher samples' value range
  (max - min over the whole set): the usual image PSNR, in latent space.
- per step k of the sampler: the trajectory error (rel. L2 of the two latents after step k, each model
  following its own trajectory) and the one-step error (rel. L2 of the student's prediction against the
  teacher's, both at the TEACHER's latent of step k: the error a single step adds, free of accumulation).
- the one-step error by timestep group (``floor(t) mod G``, the activation-clip groups the student's
  quantizers learned), so a group whose clipping is off stands out.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Sequence

import torch


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squares (float64) of a batch [B, ...]."""
    return t.double().flatten(1).pow(2).sum(dim=1)


class RelativeError:
    """Running ||a - b||^2 and ||b||^2, summed over batches."""

    def __init__(self):
        self.diff = 0.0
        self.ref = 0.0

    def add(self, value: torch.Tensor, reference: torch.Tensor) -> None:
        self.diff += float(_sq(value.float() - reference.float()).sum())
        self.ref += float(_sq(reference.float()).sum())

    @property
    def value(self) -> float:
        return math.sqrt(self.diff / self.ref) if self.ref > 0 else float("nan")


class FidelityMeter:
    """Everything ``evaluate`` reports, fed one sampler step (and one batch) at a time."""

    def __init__(self, timesteps: Sequence[float], num_timestep_groups: int):
        self.timesteps = list(timesteps)
        self.groups = num_timestep_groups
        self.trajectory = [RelativeError() for _ in self.timesteps]
        self.one_step = [RelativeError() for _ in self.timesteps]
        self.final = RelativeError()
        self.per_sample: List[float] = []
        self.sq_err = 0.0
        self.count = 0
        self.lo, self.hi = math.inf, -math.inf

    def add_step(self, k: int, student_latent, teacher_latent, student_pred_at_teacher, teacher_pred) -> None:
        self.trajectory[k].add(student_latent, teacher_latent)
        self.one_step[k].add(student_pred_at_teacher, teacher_pred)

    def add_final(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        self.final.add(student, teacher)
        diff, ref = _sq(student.float() - teacher.float()), _sq(teacher.float())
        self.per_sample.extend((diff / ref.clamp_min(1e-30)).sqrt().tolist())
        self.sq_err += float(diff.sum())
        self.count += teacher.numel()
        self.lo = min(self.lo, float(teacher.min()))
        self.hi = max(self.hi, float(teacher.max()))

    def group_of(self, timestep: float) -> int:
        return int(math.floor(timestep)) % self.groups

    def results(self) -> Dict:
        mse = self.sq_err / max(self.count, 1)
        peak = self.hi - self.lo
        psnr = float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)
        by_group: Dict[int, RelativeError] = defaultdict(RelativeError)
        for t, err in zip(self.timesteps, self.one_step):
            agg = by_group[self.group_of(t)]
            agg.diff += err.diff
            agg.ref += err.ref
        return {
            "rel_l2": self.final.value,
            "psnr_db": psnr,
            "samples": len(self.per_sample),
            "sampling_steps": len(self.timesteps),
            "per_sample_rel_l2": self.per_sample,
            "timesteps": self.timesteps,
            "trajectory_rel_l2": [e.value for e in self.trajectory],
            "one_step_rel_l2": [e.value for e in self.one_step],
            "one_step_rel_l2_by_timestep_group": {str(g): by_group[g].value for g in sorted(by_group)},
        }
