"""Fit a full-precision teacher from scratch on the latent shards (flow matching / v-prediction).

Real runs start from pretrained weights converted from diffusers; this exists for the tiny recipes, so
that the CPU demo distils a teacher that has learned something (a random teacher's predictions are
near zero and the distillation loss is noise). The result is a megatron checkpoint in exactly the
format tools/convert/diffusers_to_megatron.py writes, usable as ``--init-from``.

With ``checkpoint_dir`` the fit saves a full training checkpoint (model, optimizer, schedule, RNG, data
position) every ``checkpoint_every`` steps and, started again, continues from the newest one: a fit cut short
(a time-limited job, a preemption) ends with the same teacher as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_qvgen.config import ExperimentConfig
from megatron_qvgen.config.errors import ConfigError
from megatron_qvgen.convert.checkpoint_io import content_metadata
from megatron_qvgen.dist_ckpt import save_sharded
from megatron_qvgen.models import build_model_chunks, reduce_replicated_grads
from megatron_qvgen.models.common.schedule import run_pipeline
from megatron_qvgen.parallel import initialize_parallel
from megatron_qvgen.training.diffusion import noise_generator, objective_for
from megatron_qvgen.training.optimizer import build_optimization

log = logging.getLogger(__name__)


# What a fit checkpoint embodies: resuming it with any of these changed would silently fit another teacher.
FIT_FIXED_FIELDS = ("train.steps", "train.lr", "train.seed", "train.global_batch_size", "train.micro_batch_size",
                    "train.flow_shift", "train.snr_shift_scale")


def fit_teacher(cfg: ExperimentConfig, out_dir: str, steps: int, lr: float = 1e-3,
                checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0) -> float:
    """Train the bf16-spec model for ``steps`` steps; save it to ``out_dir``; return the last loss."""
    from megatron_qvgen.data import build_latent_loader, ensure_synthetic_dataset
    from megatron_qvgen.training import checkpointing as ckpt

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
    first = 0
    resume = ckpt.latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if resume is not None:
        _check_resume(resume, cfg)
        common = ckpt.load_checkpoint(resume, opt.chunks, opt.optimizer, opt.scheduler)
        first = int(common["step"])
        loader.load_state_dict(common["common"]["data"])
        if info.rank == 0:
            log.info("fit teacher: continuing from %s (step %d of %d)", resume, first, steps)
    last_loss = float("nan")
    logging_rank = info.rank == info.world_size - 1           # the last stage holds the loss
    # A bar on a terminal; in a log file one line per tenth of the run instead of hundreds of redraws.
    bar = tqdm(range(first, steps), desc="fit teacher", initial=first, total=steps,
               disable=not (logging_rank and sys.stderr.isatty()))
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
        if checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            ckpt.save_checkpoint(checkpoint_dir, step + 1, opt.chunks, opt.optimizer, opt.scheduler,
                                 {"data": loader.state_dict(), "config": cfg.to_dict()}, model_cfg=m, keep_last=1)
    state = {"model": raw[0].sharded_state_dict()} if len(raw) == 1 else \
        {f"model{i}": c.sharded_state_dict() for i, c in enumerate(raw)}
    state.update(content_metadata(m))  # the model config travels with the weights, as the converter records it
    save_sharded(state, out_dir, overwrite=True)
    return last_loss


def _check_resume(path: str, cfg: ExperimentConfig) -> None:
    """Refuse a fit checkpoint of another model, data stream or schedule, naming each changed field."""
    from megatron_qvgen.training.checkpointing import read_common
    from megatron_qvgen.training.run_config_check import changed_fixed_fields

    stored = read_common(path).get("common", {}).get("config")
    if stored is None:
        raise ConfigError(f"fit checkpoint {path} records no config: it is not a teacher fit's checkpoint")
    changes = changed_fixed_fields(stored, cfg, also=FIT_FIXED_FIELDS)
    if changes:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items()))
        raise ConfigError(f"fit checkpoint {path} was made with other settings ({listed}); to fit another "
                          "teacher use another checkpoint folder")


def _finalize(model_chunks, *args, **kwargs):
    reduce_replicated_grads(model_chunks)
    for chunk in model_chunks:
        chunk.finish_grad_sync()
