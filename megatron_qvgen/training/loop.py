"""The distillation run: set-up (fresh or resumed), the step loop, monitoring, checkpoints, preemption.

Run-directory rules (who may write it, where a run continues from, which config changes a resume
accepts) live in training/run_directory.py; signals, time-based saves and stops and the exit status in
training/run_control.py."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_qvgen.config import ExperimentConfig
from megatron_qvgen.config.errors import UserError
from megatron_qvgen.models import build_model_chunks, reduce_replicated_grads
from megatron_qvgen.models.common.schedule import video_tokens
from megatron_qvgen.parallel import ParallelInfo, initialize_parallel
from megatron_qvgen.quant import initialize_quantizers
from megatron_qvgen.quant.rank_decay import RankDecay, RankDecaySchedule
from megatron_qvgen.training import checkpointing as ckpt
from megatron_qvgen.training.aux_stats import aux_singular_value_summary
from megatron_qvgen.training.diffusion import objective_for
from megatron_qvgen.training.distill import data_parallel_mean, distill_step, make_microbatches
from megatron_qvgen.training.evaluation import build_eval_set, eval_loss
from megatron_qvgen.training.monitor import Monitor, peak_memory_gib, preview_strip, step_flops
from megatron_qvgen.training.optimizer import (MegatronOptimizerAdapter, Optimization, build_optimization,
                                               lrs_by_group, rebuild_without)
from megatron_qvgen.training.run_control import RunClock, RunOutcome, StopSignals
from megatron_qvgen.training.run_directory import RunStart, open_run_directory

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """Too many consecutive non-finite losses: the run stops; the last good checkpoint is untouched."""


@dataclass
class RunState:
    step: int = 0                       # optimizer steps completed
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    losses: List[float] = field(default_factory=list)
    eval_losses: List = field(default_factory=list)  # (step, loss) on the fixed evaluation set
    outcome: Optional[RunOutcome] = None             # how the run ended (exit status, last line)


def _count_replicated_embedders_once(chunks, first_stage: bool) -> None:
    """Embedders live on every pipeline stage; megatron's grad norm must count them once, so every copy
    but the first stage's first chunk is tagged ``shared`` (megatron's mark for tied duplicates)."""
    from megatron_qvgen.models.common.pipeline import PIPELINE_REPLICATED

    for i, chunk in enumerate(chunks):
        if first_stage and i == 0:
            continue
        for p in chunk.parameters():
            if getattr(p, PIPELINE_REPLICATED, False):
                p.shared = True


def _data_parallel_sum(value: int, device) -> int:
    from megatron.core import parallel_state as ps

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return int(t.item())


class Trainer:
    def __init__(self, cfg: ExperimentConfig, init_from: Optional[str] = None):
        self.cfg = cfg
        self.init_from = init_from
        self.state = RunState()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> "Trainer":
        self.signals = StopSignals().install()   # first: a signal during set-up must not kill the run
        started = time.monotonic()
        try:
            self.info: ParallelInfo = initialize_parallel(self.cfg.parallel, seed=self.cfg.train.seed)
            self.run: RunStart = open_run_directory(self.cfg)
            self.cfg = self.run.cfg
            if not self.run.complete:
                self._build_run()
                self.clock = RunClock(self.cfg.train.save_interval_minutes, self.cfg.train.exit_after_minutes,
                                      self.signals, started, is_rank0=self.info.rank == 0)
        except BaseException:
            self._release()
            raise
        return self

    def _build_run(self) -> None:
        cfg = self.cfg
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.objective = objective_for(cfg.model.arch, cfg.train.flow_shift, cfg.train.snr_shift_scale)
        self.teacher = self._build("bf16")
        self.student = self._build("qat")
        for chunk in self.teacher:
            chunk.requires_grad_(False)
            chunk.eval()
        self.loader = self._build_loader()
        self.schedule = RankDecaySchedule(cfg.quant, cfg.decay_phase_steps)
        resume = self.run.resume
        if self.init_from:
            self._load_teacher(self.init_from)
        self._copy_teacher_into_student()
        if resume is not None:
            RankDecay(self.student, self.schedule).restore(ckpt.holds_aux_factors(resume))
            self.opt = build_optimization(self.student, cfg)
            common = ckpt.load_checkpoint(resume, self.opt.chunks, self.opt.optimizer, self.opt.scheduler)
            self.state.step = common["step"]
            extra = common["common"]
            self.state.nonfinite_skipped = extra.get("nonfinite_skipped", 0)
            self.state.nonfinite_in_a_row = extra.get("nonfinite_in_a_row", 0)   # a stop mid-streak keeps the count
            # another parallel layout: the data position is translated (exact with data.split = global)
            same_layout = tuple(common.get("layout", ())) == (self.info.pp_size, self.info.tp_size, self.info.dp_size)
            self.loader.load_state_dict(extra["data"], strict=same_layout)
            self.resumed_from = resume
            self.resumed_config = extra.get("config")     # the run config the checkpoint was saved with
            self.resumed_extras = extra.get("extras", {})
        else:
            initialize_quantizers(self.student)   # PTQ: clip search + auxiliary SVD
            self.opt = build_optimization(self.student, cfg)
            self.resumed_from = None
            self.resumed_config = None
            self.resumed_extras = {}
        self.saved_step = self.state.step if self.run.own else None   # the newest step already on disk
        self._wire_grad_finalisation()
        self.decay = RankDecay(self.student, self.schedule, MegatronOptimizerAdapter(self.opt.optimizer))
        self.eval_set = None
        if cfg.train.eval_interval:
            m = cfg.model
            self.eval_set = build_eval_set(cfg, self.objective, num_microbatches=cfg.train.eval_microbatches,
                                           dtype=self.dtype, device=self.info.device, latent_channels=m.in_channels,
                                           text_len=m.text_len, text_dim=m.text_dim if m.arch == "wan" else m.text_embed_dim)
        # purge_step: TensorBoard drops what a killed run logged after this checkpoint (those steps are redone)
        self.monitor = Monitor(self._is_logging_rank(), cfg.train.tensorboard_dir, self.info.world_size,
                               total_steps=cfg.train.steps, start_step=self.state.step,
                               purge_step=self.state.step + 1 if resume is not None else None)
        self.save_strategy, self.async_saves = self._checkpoint_writer()
        self._excluded_s = 0.0          # save / eval time inside the current log interval (not throughput)
        self._steps_since_log = 0

    def _build(self, spec: str):
        cfg = self.cfg
        # Same seed for both: with random initialisation teacher and student start from the same weights.
        torch.manual_seed(cfg.train.seed)
        chunks = build_model_chunks(cfg.model, cfg.parallel, spec=spec, quant=cfg.quant if spec == "qat" else None,
                                    params_dtype=self.dtype, recompute=cfg.train.recompute and spec == "qat")
        _count_replicated_embedders_once(chunks, first_stage=self.info.pp_rank == 0)
        return chunks

    def _build_loader(self):
        from megatron_qvgen.data import build_latent_loader, ensure_synthetic_dataset

        cfg, m = self.cfg, self.cfg.model
        text_dim = m.text_dim if m.arch == "wan" else m.text_embed_dim
        if self.info.rank == 0:
            ensure_synthetic_dataset(cfg.data, m.in_channels, m.text_len, text_dim)
        dist.barrier()
        return build_latent_loader(cfg.data, cfg.train.micro_batch_size, self.info.dp_rank, self.info.dp_size,
                                   model=m, log_bad_samples=self.info.tp_rank == 0 and self.info.pp_rank == 0,
                                   microbatches_per_step=cfg.train.num_microbatches(self.info.dp_size))

    def _load_teacher(self, path: str) -> None:
        """Full-precision weights from a converted (diffusers -> megatron) checkpoint, checked against
        the model config it records when it records one."""
        from megatron_qvgen.convert.checkpoint_io import CONTENT_KEY, load_model
        from megatron_qvgen.dist_ckpt import load_common

        recorded = CONTENT_KEY in (load_common(path) or {})
        load_model(self.teacher, path, self.cfg.model if recorded else None)

    def _copy_teacher_into_student(self) -> None:
        for t_chunk, s_chunk in zip(self.teacher, self.student):
            result = s_chunk.load_state_dict(t_chunk.state_dict(), strict=False)
            if result.unexpected_keys:
                raise RuntimeError(f"teacher tensors with no student counterpart: {result.unexpected_keys[:5]}")

    def _wire_grad_finalisation(self) -> None:
        def finalize(model_chunks, *args, **kwargs):
            # Embedders replicated over pipeline stages and sequence-parallel norm/bias params first:
            # the distributed optimizer's reduce-scatter leaves only each rank's shard of a buffer valid.
            # (megatron's finalize_model_grads assumes a language model's tied embeddings under PP.)
            reduce_replicated_grads(model_chunks)
            for chunk in model_chunks:
                chunk.finish_grad_sync()

        for chunk in self.opt.chunks:
            config = chunk.config
            config.finalize_model_grads_func = finalize
            config.grad_scale_func = self.opt.optimizer.scale_loss

    def _is_logging_rank(self) -> bool:
        i = self.info
        return i.pp_rank == i.pp_size - 1 and i.tp_rank == 0 and i.dp_rank == 0

    # ------------------------------------------------------------------ the loop
    def train(self) -> RunState:
        """Run to train.steps, or until a signal / train.exit_after_minutes stops it after a save.
        ``state.outcome`` says which (and the exit status); rank 0 prints it as the last line."""
        if self.run.complete:
            self.state.step = self.run.step
            self.state.outcome = RunOutcome("complete", self.run.step, self.cfg.train.steps, self.run.resume)
            self._release()
            self._announce()
            return self.state
        try:
            self.state.outcome = self._loop()
            self._finish_saves()
        finally:
            self._release()
        dist.barrier()   # every rank is done with its logs before any leaves (launchers watch the first exit)
        self._announce()
        return self.state

    def _loop(self) -> RunOutcome:
        t = self.cfg.train
        num_micro = t.num_microbatches(self.info.dp_size)
        self.monitor.step_time()
        while True:
            decision = self.clock.poll()
            if self.async_saves is not None:
                self.async_saves.poll()     # complete the background saves every rank has finished
            if self.state.step >= t.steps:
                return RunOutcome("finished", self.state.step, t.steps, self._save_if_new())
            if decision.stop:
                path = self._save_if_new()
                if self.info.rank == 0:
                    log.warning("%s: stopping at step %d", decision.stop, self.state.step)
                return RunOutcome("stopped", self.state.step, t.steps, path, reason=decision.stop)
            if decision.save:
                self._save_if_new()
            began = time.monotonic()
            self._one_step(num_micro)
            self.clock.step_took(time.monotonic() - began)
            if t.save_interval and self.state.step % t.save_interval == 0 and self.state.step < t.steps:
                self._save_if_new()

    def _one_step(self, num_micro: int) -> None:
        cfg, t = self.cfg, self.cfg.train
        step = self.state.step
        gate = self.decay.on_step(step)
        if self.decay.adapter.removed:  # rank 0 reached: rebuild DDP + optimizer without L and R
            self.opt = rebuild_without(self.opt, cfg)
            self._wire_grad_finalisation()
            self.decay.adapter = MegatronOptimizerAdapter(self.opt.optimizer)
        batches = [next(self.loader) for _ in range(num_micro)]
        device = self.info.device
        micro = make_microbatches(batches, self.objective, seed=t.seed, step=step, dp_rank=self.info.dp_rank,
                                  arch=cfg.model.arch, dtype=self.dtype, device=device)
        for chunk in self.opt.chunks:
            chunk.zero_grad_buffer()
        self.opt.optimizer.zero_grad()
        result = distill_step(self.opt.chunks, self.teacher, micro, gate)
        values: Dict[str, float] = {}
        if result.finite:
            ok, grad_norm, _ = self.opt.optimizer.step()
            self.opt.scheduler.step(increment=1)
            self.state.nonfinite_in_a_row = 0
            values["grad_norm"] = grad_norm
        else:
            self.state.nonfinite_skipped += 1
            self.state.nonfinite_in_a_row += 1
            if self.state.nonfinite_in_a_row > t.max_consecutive_nonfinite:
                last = ckpt.latest_checkpoint(t.save_dir) if t.save_dir else None
                raise NonFiniteLossError(
                    f"{self.state.nonfinite_in_a_row} consecutive non-finite losses at step {step} (limit "
                    f"train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}); the last good checkpoint "
                    f"{last or '(none saved)'} is intact")
        loss = data_parallel_mean(result.loss, device) if result.finite else (
            float("nan") if result.loss is not None else None)
        self.state.step += 1
        if loss is not None:
            self.state.losses.append(loss)
        self.monitor.advance(loss, self.decay.current_rank())
        if self.eval_set is not None and (self.state.step % t.eval_interval == 0 or self.state.step == t.steps):
            began = time.monotonic()
            values["eval/loss"] = data_parallel_mean(
                eval_loss(self.opt.chunks, self.teacher, self.eval_set, gate), device)
            self.state.eval_losses.append((self.state.step, values["eval/loss"]))
            self._excluded_s += time.monotonic() - began
        self._steps_since_log += 1
        if self.state.step % t.log_interval == 0 or self.state.step == t.steps:
            self._log(step, loss, values, gate, batches, result)

    def _log(self, step, loss, values, gate, batches, result) -> None:
        cfg = self.cfg
        # training time per step: save and evaluation time of the interval are not throughput
        elapsed = max(self.monitor.step_time() - self._excluded_s, 0.0) / max(self._steps_since_log, 1)
        self._excluded_s, self._steps_since_log = 0.0, 0
        latent_shape = batches[0].latents.shape
        tokens = video_tokens(self.student[0], (1,) + tuple(latent_shape[1:]) if cfg.model.arch == "wan"
                              else (1, latent_shape[2], latent_shape[1]) + tuple(latent_shape[3:]))
        flops = step_flops(cfg.model, tokens, cfg.train.global_batch_size)
        sv = aux_singular_value_summary(self.student)
        bad = _data_parallel_sum(sum(self.loader.bad_samples.values()), self.info.device)
        values.update({
            "loss": loss, "aux/rank": float(self.decay.current_rank()), "aux/gate": gate,
            "throughput/samples_per_s": cfg.train.global_batch_size / max(elapsed, 1e-9),
            "throughput/tflops_per_gpu": flops / max(elapsed, 1e-9) / self.info.world_size / 1e12,
            "memory/peak_gib": peak_memory_gib(), "data/bad_samples": float(bad),
            "nonfinite/skipped": float(self.state.nonfinite_skipped),
            **{f"aux/{k}": v for k, v in sv.items()},
            **{f"lr/{k}": v for k, v in lrs_by_group(self.opt.optimizer, cfg).items()},
        })
        if values.get("grad_norm") is not None:
            values["grad_norm"] = float(values["grad_norm"])
        self.monitor.scalars(self.state.step, values)
        self.monitor.console(self.state.step, cfg.train.steps, values)
        interval = cfg.train.image_interval
        if interval and self.state.step % interval == 0 and result.teacher and result.student:
            self.monitor.images(self.state.step, {"samples/data|teacher|student_x0": self._preview(batches, result)})

    def _preview(self, batches, result) -> torch.Tensor:
        """The clean latent of this step's first sample and the x0 that teacher and student predict from it."""
        mb = result.inputs[0]
        x_t, ts = mb["latents"][:1].float().cpu(), mb["timestep"][:1].cpu()
        cog = self.cfg.model.arch == "cogvideox"  # (B, F, C, H, W) model layout
        latents = [batches[0].latents[0]]
        for pred in (result.teacher[0], result.student[0]):
            x0 = self.objective.predicted_x0(x_t, ts, pred[:1].float().cpu())[0]
            latents.append(x0.transpose(0, 1) if cog else x0)
        return preview_strip(latents)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_writer(self):
        """(save strategy, async save queue or None) for this run's saves."""
        from megatron.core import parallel_state as ps

        from megatron_qvgen.dist_ckpt import AsyncSaves, save_strategy

        t = self.cfg.train
        group = ps.get_data_parallel_group() if t.fully_parallel_save and self.info.dp_size > 1 else None
        return save_strategy(group), (AsyncSaves() if t.async_save and t.save_dir else None)

    def save(self) -> Optional[str]:
        """Collective: a checkpoint of the current step (returns its path; None without train.save_dir)."""
        t = self.cfg.train
        if not t.save_dir or self.state.step == 0:
            return None
        began = time.monotonic()
        step = self.state.step
        common = {"data": self.loader.state_dict(), "nonfinite_skipped": self.state.nonfinite_skipped,
                  "nonfinite_in_a_row": self.state.nonfinite_in_a_row, "config": self.cfg.to_dict()}
        extras = self.checkpoint_extras()
        if extras:
            common["extras"] = extras
        path = ckpt.save_checkpoint(t.save_dir, step, self.opt.chunks, self.opt.optimizer, self.opt.scheduler,
                                    common, model_cfg=self.cfg.model, keep_last=t.keep_last,
                                    strategy=self.save_strategy, async_saves=self.async_saves,
                                    on_complete=lambda p: self._saved(p, step, began))
        blocked = time.monotonic() - began
        self._excluded_s += blocked
        self.monitor.scalars(step, {"checkpoint/save_seconds": blocked})
        self.saved_step = step
        return path

    def checkpoint_extras(self) -> Dict:
        """JSON-like state a subclass keeps across a stop (saved with each checkpoint, read back on resume as
        ``self.resumed_extras``); the trainer itself needs none."""
        return {}

    def _saved(self, path: str, step: int, began: float) -> None:
        seconds = time.monotonic() - began
        self.clock.save_took(seconds)
        if self.info.rank == 0:
            log.info("checkpoint %s complete in %.1f s; the slowest step took %.1f s: a stop signal must come "
                     ">= %.0f s before the time limit", path, seconds, self.clock.slowest_step_s,
                     self.clock.signal_lead_needed_s())
        if self.async_saves is not None:
            self.monitor.scalars(step, {"checkpoint/async_complete_seconds": seconds})

    def _save_if_new(self) -> Optional[str]:
        """Save unless this step is already on disk; returns the newest checkpoint of this run."""
        if self.saved_step != self.state.step:
            self.save()
        if self.async_saves is not None:
            self.async_saves.poll()
        return ckpt.iteration_dir(self.cfg.train.save_dir, self.saved_step) if (
            self.cfg.train.save_dir and self.saved_step) else None

    def _finish_saves(self) -> None:
        if getattr(self, "async_saves", None) is not None:
            self.async_saves.close()

    def _release(self) -> None:
        """Give back what the run holds: signal handlers, TensorBoard, the async writer, the run-directory lock."""
        self.signals.uninstall()
        if getattr(self, "async_saves", None) is not None:
            self.async_saves.shutdown()   # after close() a no-op; on an error path nothing is completed
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        run = getattr(self, "run", None)
        if run is not None and run.lock is not None:
            run.lock.release()

    def _announce(self) -> None:
        if self.info.rank == 0:
            print(self.state.outcome.line(), flush=True)
