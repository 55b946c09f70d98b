"""What a run shows: TensorBoard scalars and images, and the same figures as one console line per log step
(plus a progress bar when stderr is a terminal).

Only the logging rank (last pipeline stage, first TP and DP rank: it holds the loss) writes. FLOPs are the
model's own count per sample (linears and attention, forward = 1x, backward = 2x): the student's
forward+backward plus the teacher's forward.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Dict, Optional

import torch

from megatron_qvgen.config import ModelConfig


# What the console line shows, in order: (scalar key, label). Labels say what the number is: the learning rate
# of the weights' group is `lr`, the auxiliary module's current rank is `aux_rank`.
CONSOLE_FIELDS = (
    ("loss", "loss"), ("eval/loss", "eval_loss"), ("grad_norm", "grad_norm"), ("lr/weights", "lr"),
    ("aux/rank", "aux_rank"), ("aux/gate", "aux_gate"), ("throughput/samples_per_s", "samples_per_s"),
    ("throughput/tflops_per_gpu", "tflops_per_gpu"), ("memory/peak_gib", "peak_gib"),
    ("data/bad_samples", "bad_samples"), ("nonfinite/skipped", "nonfinite_skipped"),
)


def forward_flops_per_sample(model: ModelConfig, video_tokens: int) -> float:
    """Matmul FLOPs of one forward of one sample (2 per multiply-add)."""
    h, layers, text = model.hidden_size, model.num_layers, model.text_len
    if model.arch == "wan":
        per_layer = (2 * video_tokens * (4 * h * h + 2 * h * h + 2 * h * model.ffn_dim)   # self qkvo, cross q/o, ffn
                     + 2 * text * 2 * h * h                                                  # cross k, v on text tokens
                     + 4 * video_tokens * video_tokens * h                                   # self-attention scores + values
                     + 4 * video_tokens * text * h)                                          # cross-attention
    else:  # CogVideoX: joint attention over [text; video]
        seq = video_tokens + text
        per_layer = 2 * seq * (4 * h * h + 2 * h * model.ffn_dim) + 4 * seq * seq * h
    return float(per_layer * layers)


def step_flops(model: ModelConfig, video_tokens: int, samples: int) -> float:
    """Student forward+backward (3x) and teacher forward (1x)."""
    return 4.0 * forward_flops_per_sample(model, video_tokens) * samples


class Monitor:
    def __init__(self, is_logging_rank: bool, tensorboard_dir: Optional[str], world_size: int,
                 total_steps: int = 0, start_step: int = 0, progress_bar: bool = True,
                 purge_step: Optional[int] = None):
        self.is_logging_rank = is_logging_rank
        self.world_size = world_size
        self.writer = None
        if is_logging_rank and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events a killed run wrote for the steps it redoes
            self.writer = SummaryWriter(log_dir=tensorboard_dir, purge_step=purge_step)
        self.bar = None
        # The bar is for a terminal; in a log file its redraws would bury the one line per log interval.
        if is_logging_rank and progress_bar and total_steps and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="QAT distillation", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self._last = time.perf_counter()

    def advance(self, loss: Optional[float], rank: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4g}", aux_rank=rank, refresh=False)

    def step_time(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), step)

    def images(self, step: int, images: Dict[str, torch.Tensor]) -> None:
        """``images``: name -> float tensor [3, H, W] in [0, 1]."""
        if self.writer is None:
            return
        for key, img in images.items():
            self.writer.add_image(key, img.clamp(0, 1), step, dataformats="CHW")

    def console(self, step: int, total: int, values: Dict[str, float]) -> None:
        if not self.is_logging_rank:
            return
        parts = [f"step {step}/{total}"]
        for key, label in CONSOLE_FIELDS:
            if key in values and values[key] is not None:
                v = values[key]
                parts.append(f"{label} {v:.4g}" if isinstance(v, float) else f"{label} {v}")
        line = " | ".join(parts)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def preview_strip(latents, min_height: int = 128) -> torch.Tensor:
    """First frame of each latent (C, F, H, W) side by side, channels 0-2 as RGB, one shared colour scale
    (taken from the first, the data) so that a student that drifts from the teacher shows, upscaled
    (nearest) to be legible. Returns CHW in [0, 1]."""
    frames = []
    for latent in latents:
        frame = latent[:3, 0].float().cpu()
        if frame.shape[0] < 3:
            frame = torch.cat([frame, frame[:1].expand(3 - frame.shape[0], -1, -1)])
        frames.append(frame)
    lo = frames[0].amin(dim=(1, 2), keepdim=True)
    hi = frames[0].amax(dim=(1, 2), keepdim=True)
    gap = torch.ones(3, frames[0].shape[1], 1)
    strip = torch.cat([t for f in frames for t in (((f - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1), gap)][:-1], dim=2)
    scale = max(1, -(-min_height // strip.shape[1]))
    return strip.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")
