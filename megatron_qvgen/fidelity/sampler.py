"""Each model family's own deterministic sampler, written over the training objective's noise schedule
(``training/diffusion.py``) so that sampling sees exactly the timesteps training did.

- Wan (flow matching): first-order Euler from sigma = 1 to 0 on ``steps`` levels spaced evenly in sigma and
  shifted by ``flow_shift`` (diffusers' ``FlowMatchEulerDiscreteScheduler``); the model's timestep is
  ``1000 sigma``, as in training.
- CogVideoX (v-prediction, zero terminal SNR): DDIM with eta = 0 on "trailing" timesteps (999, ...) and
  ``set_alpha_to_one`` (diffusers' ``CogVideoXDDIMScheduler`` as the CogVideoX pipelines configure it).

A sampler works on float32 latents in the model's layout: ``timesteps()`` lists the model timesteps of the
steps; ``step(x, k, prediction)`` moves x from step k to k + 1. After the last step x is the sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Union

import torch

from megatron_qvgen.training.diffusion import NUM_TRAIN_TIMESTEPS, FlowMatching, VPrediction


@dataclass(frozen=True)
class FlowMatchEuler:
    steps: int
    shift: float = 1.0
    name: str = "flow-matching Euler"

    def sigmas(self) -> torch.Tensor:
        """steps + 1 noise levels from 1 to 0 (float64), shifted like training's levels."""
        levels = torch.linspace(0.0, NUM_TRAIN_TIMESTEPS, self.steps + 1, dtype=torch.float64)
        return FlowMatching(shift=self.shift).sigmas(levels)

    def timesteps(self) -> List[float]:
        return [float(s) * NUM_TRAIN_TIMESTEPS for s in self.sigmas()[:-1]]

    def step(self, x: torch.Tensor, k: int, velocity: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas()
        return x + float(sigmas[k + 1] - sigmas[k]) * velocity.float()


@dataclass(frozen=True)
class DDIMVPrediction:
    steps: int
    snr_shift_scale: float = 1.0
    name: str = "DDIM (v-prediction, trailing)"

    def _abar(self) -> torch.Tensor:
        return VPrediction(snr_shift_scale=self.snr_shift_scale).alphas_cumprod()

    def timesteps(self) -> List[int]:
        ratio = NUM_TRAIN_TIMESTEPS / self.steps
        return [int(round(NUM_TRAIN_TIMESTEPS - k * ratio)) - 1 for k in range(self.steps)]

    def step(self, x: torch.Tensor, k: int, v: torch.Tensor) -> torch.Tensor:
        abar = self._abar()
        t = self.timesteps()[k]
        prev = t - NUM_TRAIN_TIMESTEPS // self.steps
        a_t = float(abar[t])
        a_prev = float(abar[prev]) if prev >= 0 else 1.0
        x, v = x.float(), v.float()
        x0 = a_t ** 0.5 * x - (1.0 - a_t) ** 0.5 * v
        eps = (1.0 - a_t) ** 0.5 * x + a_t ** 0.5 * v
        return a_prev ** 0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps


Sampler = Union[FlowMatchEuler, DDIMVPrediction]


def sampler_for(cfg, steps: int) -> Sampler:
    """The sampler of ``cfg.model.arch`` with the run's schedule settings (flow shift / SNR shift)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    if cfg.model.arch == "wan":
        return FlowMatchEuler(steps, shift=cfg.train.flow_shift)
    if cfg.model.arch == "cogvideox":
        return DDIMVPrediction(steps, snr_shift_scale=cfg.train.snr_shift_scale)
    raise ValueError(f"no sampler for model arch {cfg.model.arch!r}")
