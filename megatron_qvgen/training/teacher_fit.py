"""Fit a full-precision teacher from scratch on the latent shards (flow matching / v-prediction).

Real runs start from pretrained weights converted from diffusers; this exists for the tiny recipes, so
that the CPU demo distils a teacher that has learned something (a random teacher's predictions are
near zero and the distillation loss is noise). The result is a megatron checkpoint in exactly the
format tools/convert/diffusers_to_megatron.py writes, usable as ``--init-from``.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_qvgen.config import ExperimentConfig
from megatron_qvgen.convert.checkpoint_io import content_metadata
from megatron_qvgen.dist_ckpt import save_sharded
from megatron_qvgen.models import build_model_chunks, reduce_replicated_grads
from megatron_qvgen.models.common.schedule import run_pipeline
from megatron_qvgen.parallel import initialize_parallel
from megatron_qvgen.training.diffusion import noise_generator, objective_for
from megatron_qvgen.training.optimizer import build_optimization

log = logging.getLogger(__name__)


def fit_teacher(cfg: ExperimentConfig, out_dir: str, steps: int, lr: float = 1e-3) -> float:
    """Train the bf16-spec model for ``steps`` steps; save it to ``out_dir``; return the last loss."""
    from megatron_qvgen.data import build_latent_loader, ensure_synthetic_dataset

    train = dataclasses.replace(cfg.train, steps=steps, lr=lr, warmup_fraction=0.05, aux_lr=lr, act_clip_lr=lr)
    cfg = dataclasses.replace(cfg, train=train)
    info = initialize_parallel(cfg.parallel, seed=cfg.train.seed)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    m = cfg.model
    text_dim = m.text_dim if m.arch == "wan" else m.text_embed_dim
    if info.rank == 0:
        ensure_synthetic_dataset(cfg.data, m.in_channels, m.text_len, text_dim)
    torch.distributed.barrier()
    loader = build_latent_loader(cfg.data, cfg.train.micro_batch_size, info.dp_rank, info.dp_size,
                                 latent_channels=m.in_channels, text_len=m.text_len, text_dim=text_dim)
    torch.manual_seed(cfg.train.seed)
    raw = build_model_chunks(m, cfg.parallel, spec="bf16", params_dtype=dtype)
    opt = build_optimization(raw, cfg)
    for chunk in opt.chunks:
        chunk.config.finalize_model_grads_func = _finalize
        chunk.config.grad_scale_func = opt.optimizer.scale_loss
    objective = objective_for(m.arch, cfg.train.flow_shift, cfg.train.snr_shift_scale)
    num_micro = cfg.train.num_microbatches(info.dp_size)
    last_loss = float("nan")
    logging_rank = info.rank == info.world_size - 1           # the last stage holds the loss
    # A bar on a terminal; in a log file one line per tenth of the run instead of hundreds of redraws.
    bar = tqdm(range(steps), desc="fit teacher", disable=not (logging_rank and sys.stderr.isatty()))
    every = max(1, steps // 10)
    for step in bar:
        micro = []
        for i in range(num_micro):
            batch = next(loader)
            gen = noise_generator(cfg.train.seed + 1, step, info.dp_rank * num_micro + i)
            x_t, timestep, noise = objective.add_noise(batch.latents, gen)
            target = objective.target(batch.latents, noise, timestep)
            if m.arch == "cogvideox":
                x_t, target = x_t.permute(0, 2, 1, 3, 4), target.permute(0, 2, 1, 3, 4)
            micro.append({"latents": x_t.to(info.device, dtype), "timestep": timestep.to(info.device),
                          "text_embeds": batch.text.to(info.device, dtype), "target": target.to(info.device)})
        for chunk in opt.chunks:
            chunk.zero_grad_buffer()
        opt.optimizer.zero_grad()
        losses = []

        def loss_fn(pred, mb):
            loss = F.mse_loss(pred.float(), mb["target"])
            losses.append(loss.detach().clone())  # megatron divides the returned loss in place
            return loss

        run_pipeline(opt.chunks, micro, loss_fn=loss_fn)
        opt.optimizer.step()
        opt.scheduler.step(increment=1)
        if losses:
            last_loss = float(torch.stack(losses).mean())
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if logging_rank and bar.disable and ((step + 1) % every == 0 or step + 1 == steps):
            log.info("fit teacher: step %d/%d | loss %.4f", step + 1, steps, last_loss)
    state = {"model": raw[0].sharded_state_dict()} if len(raw) == 1 else \
        {f"model{i}": c.sharded_state_dict() for i, c in enumerate(raw)}
    state.update(content_metadata(m))  # the model config travels with the weights, as the converter records it
    save_sharded(state, out_dir, overwrite=True)
    return last_loss


def _finalize(model_chunks, *args, **kwargs):
    reduce_replicated_grads(model_chunks)
    for chunk in model_chunks:
        chunk.finish_grad_sync()
