"""How a clean latent becomes the noisy input that teacher and student both see (QVGEN.md "Objective").

- Wan, flow matching: a training level i uniform in 0..999, sigma = shift(1 - i/1000),
  ``x_t = (1 - sigma) x0 + sigma eps``, model timestep ``1000 sigma`` (float, as diffusers' samplers feed it).
- CogVideoX, DDPM v-prediction with zero terminal SNR (scaled-linear betas, rescaled; SNR shift
  ``snr_shift_scale``): t uniform in 0..999, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, timestep t.

Distillation needs no target from the schedule: the loss is the MSE between the student's and the
frozen teacher's predictions on the same (x_t, t, text). Noise and levels are drawn from a generator
seeded by (seed, step, position of the micro-batch in the global batch), so every TP/PP rank of one
data-parallel group draws the same, a resumed run draws what an uninterrupted one would, and a global
batch gets the same noise whatever its split over data-parallel ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

NUM_TRAIN_TIMESTEPS = 1000


def noise_generator(seed: int, step: int, global_microbatch: int) -> torch.Generator:
    """``global_microbatch``: dp_rank * micro-batches per rank + the rank's micro-batch index."""
    mixed = (seed * 1_000_003 + step * 10_007 + global_microbatch * 101) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@dataclass(frozen=True)
class FlowMatching:
    shift: float = 1.0

    def sigmas(self, levels: torch.Tensor) -> torch.Tensor:
        sigma = 1.0 - levels.double() / NUM_TRAIN_TIMESTEPS
        return self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)

    def add_noise(self, x0: torch.Tensor, gen: torch.Generator, levels: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, timestep, noise) for a batch x0 [B, ...]; training levels drawn unless given."""
        if levels is None:
            levels = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        sigma = self.sigmas(levels)
        s = sigma.float().view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1.0 - s) * x0.float() + s * noise
        return x_t, (sigma * NUM_TRAIN_TIMESTEPS).float(), noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The velocity eps - x0 (what a model is trained to predict from scratch)."""
        return noise - x0.float()

    def predicted_x0(self, x_t: torch.Tensor, timestep: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma v (v = eps - x0): for looking at what the model predicts."""
        s = (timestep.float() / NUM_TRAIN_TIMESTEPS).view(-1, *([1] * (x_t.dim() - 1)))
        return x_t - s * velocity


@dataclass(frozen=True)
class VPrediction:
    snr_shift_scale: float = 1.0
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def alphas_cumprod(self) -> torch.Tensor:
        betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, NUM_TRAIN_TIMESTEPS,
                               dtype=torch.float64) ** 2
        betas = _rescale_zero_terminal_snr(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        return abar / (self.snr_shift_scale + (1.0 - self.snr_shift_scale) * abar)

    def add_noise(self, x0: torch.Tensor, gen: torch.Generator, levels: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen) if levels is None else levels
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
        abar = self.alphas_cumprod()[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0.float() + (1.0 - abar).sqrt() * noise, t, noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        abar = self.alphas_cumprod()[timestep.long()].float().view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0.float()

    def predicted_x0(self, x_t: torch.Tensor, timestep: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod()[timestep.long()].float().view(-1, *([1] * (x_t.dim() - 1)))
        return abar.sqrt() * x_t - (1.0 - abar).sqrt() * v


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that the last step has zero SNR (Lin et al. 2024, Algorithm 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def objective_for(arch: str, flow_shift: float = 1.0, snr_shift_scale: float = 1.0):
    if arch == "wan":
        return FlowMatching(shift=flow_shift)
    if arch == "cogvideox":
        return VPrediction(snr_shift_scale=snr_shift_scale)
    raise ValueError(f"no diffusion objective for model arch {arch!r}")
