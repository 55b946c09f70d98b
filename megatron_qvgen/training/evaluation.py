"""A fixed evaluation batch: the student-vs-teacher loss on the same (x_t, t, text) every time.

Training losses jump with the timestep each step happens to draw; a fixed set of noisy inputs spread over
the noise levels shows the trend. The set is built identically on every rank (DP-independent: read with
dp_size 1, noise from fixed seeds), so the figure is the same whatever the parallel layout.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_qvgen.models.common.schedule import run_pipeline
from megatron_qvgen.quant.context import quant_context
from megatron_qvgen.training.diffusion import NUM_TRAIN_TIMESTEPS

EVAL_SEED_OFFSET = 7_777


def build_eval_set(cfg, objective, *, num_microbatches: int, dtype: torch.dtype, device: torch.device,
                   latent_channels: int, text_len: int, text_dim: int) -> List[Dict[str, torch.Tensor]]:
    """``num_microbatches`` micro-batches of the dataset's first samples, noise levels evenly spread."""
    import dataclasses

    from megatron_qvgen.data import build_latent_loader

    data = dataclasses.replace(cfg.data, num_workers=0, caption_dropout=0.0, seed=cfg.data.seed + EVAL_SEED_OFFSET)
    loader = build_latent_loader(data, cfg.train.micro_batch_size, 0, 1, latent_channels=latent_channels,
                                 text_len=text_len, text_dim=text_dim)
    out = []
    total = num_microbatches * cfg.train.micro_batch_size
    for i in range(num_microbatches):
        batch = next(loader)
        gen = torch.Generator().manual_seed(cfg.train.seed + EVAL_SEED_OFFSET + i)
        # evenly spread levels: the set covers the whole noise schedule
        levels = torch.tensor([(i * cfg.train.micro_batch_size + j + 0.5) * NUM_TRAIN_TIMESTEPS / total
                               for j in range(batch.latents.shape[0])]).long()
        x_t, timestep, _ = objective.add_noise(batch.latents, gen, levels=levels)
        if cfg.model.arch == "cogvideox":
            x_t = x_t.permute(0, 2, 1, 3, 4)
        out.append({"latents": x_t.to(device=device, dtype=dtype), "timestep": timestep.to(device),
                    "text_embeds": batch.text.to(device=device, dtype=dtype), "index": torch.tensor(i)})
    loader.close()
    return out


@torch.no_grad()
def eval_loss(student_chunks, teacher_chunks, eval_set, gate: float) -> Optional[float]:
    """Mean MSE student vs teacher over the set, on the last pipeline stage (None elsewhere)."""
    with quant_context(aux_gate=gate):
        teacher = run_pipeline(list(teacher_chunks), eval_set, forward_only=True)
        student = run_pipeline(list(student_chunks), eval_set, forward_only=True)
    if not student:
        return None
    return float(torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean())
