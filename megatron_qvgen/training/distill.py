"""One distillation step: the frozen teacher and the QAT student on the same (x_t, t, text) micro-batches.

The teacher runs first through megatron's schedule in forward-only mode (with pipeline parallelism its
predictions arrive on the last stage, one per micro-batch); the student then runs forward+backward through
the same schedule and its last stage takes the MSE against the stored teacher prediction. Every pipeline
stage receives every micro-batch's raw inputs (each rebuilds the conditioning); only the last stage has
a loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_qvgen.models.common.schedule import run_pipeline
from megatron_qvgen.quant.context import quant_context
from megatron_qvgen.training.diffusion import noise_generator


@dataclass
class StepResult:
    loss: Optional[float]            # mean over micro-batches, on the last pipeline stage (None elsewhere)
    finite: bool                     # agreed by every rank
    teacher: List[torch.Tensor]      # last stage: teacher predictions per micro-batch
    student: List[torch.Tensor]      # last stage: student predictions per micro-batch
    inputs: List[Dict[str, torch.Tensor]]


def make_microbatches(batches, objective, *, seed: int, step: int, dp_rank: int, arch: str,
                      dtype: torch.dtype, device: torch.device) -> List[Dict[str, torch.Tensor]]:
    """Loader batches -> model inputs: noisy latents in the model's layout, timesteps, text."""
    out = []
    for i, batch in enumerate(batches):
        gen = noise_generator(seed, step, dp_rank * len(batches) + i)
        x_t, timestep, _ = objective.add_noise(batch.latents, gen)
        if arch == "cogvideox":  # stored (C, F, H, W); diffusers' CogVideoX takes (B, F, C, H, W)
            x_t = x_t.permute(0, 2, 1, 3, 4)
        out.append({
            "latents": x_t.to(device=device, dtype=dtype),
            "timestep": timestep.to(device),
            "text_embeds": batch.text.to(device=device, dtype=dtype),
            "index": torch.tensor(i),
        })
    return out


def teacher_predictions(teacher_chunks: Sequence[torch.nn.Module], microbatches, gate: float) -> List[torch.Tensor]:
    with torch.no_grad(), quant_context(aux_gate=gate):
        return run_pipeline(list(teacher_chunks), microbatches, forward_only=True)


def distill_step(student_chunks: Sequence[torch.nn.Module], teacher_chunks: Sequence[torch.nn.Module],
                 microbatches: List[Dict[str, torch.Tensor]], gate: float) -> StepResult:
    """Forward+backward of the student against the teacher; gradients land in the DDP buffers."""
    from megatron.core import parallel_state as ps

    teacher = teacher_predictions(teacher_chunks, microbatches, gate)
    losses: List[torch.Tensor] = []

    def loss_fn(prediction: torch.Tensor, batch) -> torch.Tensor:
        target = teacher[int(batch["index"])]
        loss = F.mse_loss(prediction.float(), target.float())
        losses.append(loss.detach().clone())  # megatron divides the returned loss in place
        return loss

    with quant_context(aux_gate=gate):
        student = run_pipeline(list(student_chunks), microbatches, loss_fn=loss_fn)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    loss = torch.stack(losses).mean() if (last and losses) else None
    bad = torch.tensor([0.0 if loss is None or torch.isfinite(loss) else 1.0],
                       device=microbatches[0]["latents"].device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return StepResult(loss=None if loss is None else float(loss), finite=bool(bad.item() == 0.0),
                      teacher=teacher, student=student, inputs=microbatches)


def data_parallel_mean(value: Optional[float], device: torch.device) -> Optional[float]:
    """Average of a last-stage scalar over the data-parallel ranks (None off the last stage)."""
    from megatron.core import parallel_state as ps

    if value is None:
        return None
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return float(t.item()) / ps.get_data_parallel_world_size()
