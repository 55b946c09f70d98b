"""One run of the fidelity study: a QAT method trained from a teacher with the project's trainer, recorded step by
step, then sampled against the teacher with the evaluation tool's measurement.

    python -m megatron_qvgen.fidelity.study --teacher CKPT --recipe NAME --method qvgen|lsq|qvgen_keep_aux|decay_all|ptq
        --bits w4a4|w3a3 --seed S --json OUT.json [--samples 8] [--sampling-steps 20] [--section.field value ...]

Recorded (from the trainer's own figures: its RunState and the values it logs each step, captured through its
monitor, never recomputed): training loss, loss on the fixed evaluation set (also at step 0, the PTQ-initialised
student), gradient norm, auxiliary rank and gate. Added here: the spectrum of the effective auxiliary product
W_Phi = (gamma * L) R of every layer (singular values normalised by the layer's largest at step 0; decayed ranks
count as zeros) every few steps, and the share of its r0 singular values below 10 % of that reference (the
paper's "share of small singular values": it says the share grows, which is what makes truncation cheap).
``ptq`` trains nothing: the teacher quantized by the initialisation alone, without the auxiliary module.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megatron_qvgen.fidelity.errors import EvaluationError
from megatron_qvgen.quant.context import quant_context
from megatron_qvgen.training.evaluation import eval_loss
from megatron_qvgen.training.loop import Trainer
from megatron_qvgen.training.run_config_check import flatten_config
from megatron_qvgen.training.run_control import EXIT_STOPPED, FINISHED_MARKER as FINISHED

SMALL_SV = 0.1   # "small": below this share of the layer's largest singular value at step 0


@torch.no_grad()
def aux_spectra(model_chunks) -> List[torch.Tensor]:
    """Per layer with a live auxiliary module: singular values of (gamma * L) R, zero-padded to r0 (TP = 1).

    Through the factors' QR (A B = Qa Ra (Qb Rb)^T has the singular values of Ra Rb^T): an r x r SVD instead of
    one of the whole d_out x d_in product, which at hidden 512 made this record cost minutes per run."""
    from megatron_qvgen.quant import quant_linears

    out = []
    for layer in quant_linears(model_chunks):
        if not layer.has_aux:
            continue
        r0, rank = layer.aux_L.shape[1], layer.aux_rank
        sv = torch.zeros(r0, dtype=torch.float64)
        if rank > 0:
            left = layer.aux_L[:, :rank].double() * layer.aux_gamma().double()
            values = lowrank_singular_values(left.cpu(), layer.aux_R[:rank].double().cpu())
            sv[:values.numel()] = values
        out.append(sv)
    return out


def lowrank_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of ``left @ right`` (d_out x r times r x d_in) without forming the product."""
    r_left = torch.linalg.qr(left, mode="r").R
    r_right = torch.linalg.qr(right.T, mode="r").R
    return torch.linalg.svdvals(r_left @ r_right.T)


class SpectrumLog:
    """Normalised spectra over training; layers that lost their module (rank 0) count as all-small."""

    def __init__(self, reference: List[torch.Tensor]):
        self.reference = [float(sv.max()) or 1.0 for sv in reference]
        self.r0 = int(reference[0].numel()) if reference else 0
        self.steps: List[int] = []
        self.share_small: List[float] = []
        self.mean_spectrum: List[List[float]] = []

    def record(self, step: int, spectra: List[torch.Tensor]) -> None:
        if not self.reference:
            return
        if not spectra:   # the module was removed: nothing is left of it
            spectra = [torch.zeros(self.r0, dtype=torch.float64) for _ in self.reference]
        normed = torch.stack([sv / ref for sv, ref in zip(spectra, self.reference)])
        self.steps.append(step)
        self.share_small.append(float((normed < SMALL_SV).double().mean()))
        self.mean_spectrum.append(normed.mean(dim=0).tolist())

    def to_dict(self) -> Dict:
        return {"steps": self.steps, "share_small": self.share_small, "mean_spectrum": self.mean_spectrum,
                "threshold": SMALL_SV}

    def state_dict(self) -> Dict:
        return {**self.to_dict(), "reference": self.reference, "r0": self.r0}

    @classmethod
    def from_state(cls, state: Dict) -> "SpectrumLog":
        log = cls([])
        log.reference, log.r0 = list(state["reference"]), int(state["r0"])
        log.steps, log.share_small = list(state["steps"]), list(state["share_small"])
        log.mean_spectrum = [list(row) for row in state["mean_spectrum"]]
        return log


def study_config(recipe: str, method: str, bits: str, seed: int, overrides):
    """The recipe with the method's quant preset (rank r0 and everything else from the recipe) and the seed."""
    from megatron_qvgen.config import QuantConfig, apply_overrides
    from megatron_qvgen.recipes import get_recipe

    cfg = get_recipe(recipe)
    method_name = "lsq" if method == "ptq" else method
    rank = {} if method_name == "lsq" else {"aux_rank": cfg.quant.aux_rank}   # lsq: the preset's r0 = 0
    quant = QuantConfig.for_method(method_name, bits, num_timestep_groups=cfg.quant.num_timestep_groups, **rank)
    cfg = dataclasses.replace(cfg, quant=quant, train=dataclasses.replace(cfg.train, seed=seed, save_dir=None,
                                                                          load_dir=None, tensorboard_dir=None))
    return apply_overrides(cfg, overrides)


@contextlib.contextmanager
def _stop_signals_ignored():
    """A trained student is measured to its record (tens of seconds) even when a stop signal comes meanwhile: it
    has no checkpoint to continue from, and run_study.py's deadline waits that long before it kills (SIGKILL).
    The trainer installs its own handlers over these and restores them (SIG_IGN) when it ends."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class RunStopped(Exception):
    """A signal stopped the training (exit status 75, the trainer's): no record is written."""


def run_study(teacher: str, cfg, method: str, options, spectrum_interval: int = 5) -> Dict:
    """Train (unless ptq) and measure; returns the record (collective over the one-process group).

    With ``cfg.train.save_dir`` (``--resume-dir``) a stop signal during training saves the run, curves recorded so
    far included, and raises RunStopped; the next call with the same folder continues it to the record an
    uninterrupted run writes. A signal after the training (during the measurement) waits for the record."""
    from megatron_qvgen.fidelity.pipeline import measure
    from megatron_qvgen.fidelity.students import MegatronDenoiser, load_teacher, ptq_student

    start = time.perf_counter()
    earlier = 0.0   # seconds of the calls a continued run trained in before this one
    # Stop signals are ignored from here to the record except while the trainer's own handlers are installed
    # (set-up and training: it saves and stops), which give back SIG_IGN when it ends: a signal that comes
    # between the end of training and the measurement cannot lose a finished training.
    with _stop_signals_ignored():
        if method == "ptq":
            teacher_model = load_teacher(teacher, cfg)
            student = ptq_student(cfg, teacher_model)
            record: Dict = {"train": None, "eval_loss_ptq": _ptq_eval_loss(cfg, teacher_model, student)}
        else:
            trainer = RecordingTrainer(cfg, init_from=teacher, spectrum_interval=spectrum_interval).setup()
            state = trainer.train()
            if state.step < cfg.train.steps:   # a signal stopped it: no record of a shorter run
                saved = state.outcome.checkpoint
                where = (f"saved to {saved}: the same command continues it" if saved
                         else "nothing saved: the same command starts it over")
                raise RunStopped(f"training stopped at step {state.step} of {cfg.train.steps}; {where}")
            gate = trainer.schedule.gate_at(max(state.step - 1, 0))
            raw = getattr(trainer.opt.chunks[0], "module", trainer.opt.chunks[0])
            student = MegatronDenoiser(raw, trainer.dtype, cfg.quant.num_timestep_groups, gate=gate)
            teacher_model = MegatronDenoiser(trainer.teacher[0], trainer.dtype, None)
            record = {"train": {"steps": state.step, "loss": state.losses, "eval_loss": trainer.eval_curve(),
                                "grad_norm": trainer.grad_norms, "aux_rank": trainer.ranks,
                                "spectrum": trainer.spectrum.to_dict() if trainer.spectrum else None,
                                "seconds": trainer.training_seconds()}}
            earlier = trainer.seconds_before
        result, _, sampler = measure(teacher_model, student, cfg, options, student.device)
    record.update({"method": method, "bits": f"w{cfg.quant.weight_bits}a{cfg.quant.act_bits}",
                   "seed": cfg.train.seed, "sampler": sampler.name, "fidelity": result.results,
                   "config": cfg.to_dict(), "seconds": earlier + time.perf_counter() - start})
    return record


def _ptq_eval_loss(cfg, teacher_model, student) -> float:
    """The fixed evaluation set's loss of the PTQ student (what the trained runs record at step 0 and after)."""
    from megatron_qvgen.fidelity.inputs import model_text_dim
    from megatron_qvgen.training.diffusion import objective_for
    from megatron_qvgen.training.evaluation import build_eval_set

    m = cfg.model
    eval_set = build_eval_set(cfg, objective_for(m.arch, cfg.train.flow_shift, cfg.train.snr_shift_scale),
                              num_microbatches=cfg.train.eval_microbatches, dtype=student.dtype,
                              device=student.device, latent_channels=m.in_channels, text_len=m.text_len,
                              text_dim=model_text_dim(m))
    return eval_loss([student.model], [teacher_model.model], eval_set, gate=1.0)


def mark_finished(resume_dir: str, record_path: str) -> None:
    """After the record is written: the run's checkpoint (if a stop left one) is spent; a later start of the same
    run must not continue from it (run_study.py moves such a folder aside)."""
    folder = Path(resume_dir)
    if folder.is_dir():
        tmp = folder / f".{FINISHED}.tmp"
        tmp.write_text(json.dumps({"record": str(record_path), "time": time.strftime("%Y-%m-%d %H:%M:%S")}))
        tmp.replace(folder / FINISHED)


class RecordingTrainer(Trainer):
    """The project's Trainer, with the values it logs each step captured (log_interval 1, console quiet) and Phi's
    spectrum read between steps; the training loop itself is untouched."""

    def __init__(self, cfg, init_from: str, spectrum_interval: int = 5):
        super().__init__(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_interval=1)), init_from)
        self.spectrum_interval = spectrum_interval
        self.grad_norms: List[Optional[float]] = []
        self.ranks: List[int] = []
        self.spectrum: Optional[SpectrumLog] = None
        self.eval_at_start: Optional[float] = None
        self.seconds_before = 0.0      # training time of the calls this run continues
        self.began = time.perf_counter()
        self.teacher_path = str(Path(init_from).resolve())

    def setup(self) -> "RecordingTrainer":
        finished = Path(self.cfg.train.save_dir or "") / FINISHED
        if self.cfg.train.save_dir and finished.exists():
            raise EvaluationError(f"{self.cfg.train.save_dir} holds the checkpoint of a run already continued to its "
                                  f"record ({finished}): training this run again would start it part-way; move "
                                  f"the folder away or give another --resume-dir")
        super().setup()
        try:
            if self.run.complete:   # only a stop saves, so this is another run's (another train.steps?)
                raise EvaluationError(f"{self.run.resume} is already at step {self.run.step} of "
                                      f"{self.cfg.train.steps}: not a stopped study run; give it another folder")
            self._start_recording()
        except BaseException:
            self._release()   # the run lock too: an out-of-memory or a foreign checkpoint leaves the folder as it was
            raise
        return self

    def _start_recording(self) -> None:
        monitor = self.monitor
        if monitor.bar is not None:
            monitor.bar.close()
            monitor.bar = None
        monitor.console = lambda *args, **kwargs: None
        inner = monitor.scalars

        def capture(step, values):
            if "aux/rank" in values:   # the step's own log line, not a save's timing
                self.grad_norms.append(values.get("grad_norm"))
                self.ranks.append(int(values["aux/rank"]))
            inner(step, values)

        monitor.scalars = capture
        if self.resumed_from is not None:
            self._restore_recording()
            return
        spectra = self._spectra(0)
        self.spectrum = SpectrumLog(spectra) if spectra else None
        if self.spectrum:
            self.spectrum.record(0, spectra)
        if self.eval_set is not None:  # the PTQ-initialised student (Phi from the SVD included)
            self.eval_at_start = eval_loss(self.opt.chunks, self.teacher, self.eval_set, self.schedule.gate_at(0))

    def checkpoint_extras(self) -> Dict:
        """The curves recorded so far, saved with the checkpoint: a stopped run continues its record."""
        return {"study_record": {
            "teacher": self.teacher_path,   # the config is in the checkpoint already (Trainer.save)
            "step": self.state.step, "losses": list(self.state.losses),
            "eval_losses": [list(x) for x in self.state.eval_losses], "grad_norms": list(self.grad_norms),
            "ranks": list(self.ranks), "eval_at_start": self.eval_at_start,
            "spectrum": self.spectrum.state_dict() if self.spectrum else None,
            "seconds": self.training_seconds()}}

    def training_seconds(self) -> float:
        """Since this run first started, over every call that trained it."""
        return self.seconds_before + time.perf_counter() - self.began

    def _restore_recording(self) -> None:
        saved = self.resumed_extras.get("study_record")
        if saved is None or saved["step"] != self.state.step or len(saved["ranks"]) != self.state.step:
            raise EvaluationError(f"{self.resumed_from} holds no study record of its step {self.state.step}: it is "
                                  f"not this study's checkpoint; give the run another train.save_dir")
        # The whole config and the teacher make a checkpoint this run's: the trainer's own resume check lets steps
        # and most hyper-parameters change, which here would splice two runs into one record.
        if saved.get("teacher") is None or self.resumed_config is None:
            raise EvaluationError(f"{self.resumed_from} does not say which run it is (saved before study checkpoints "
                                  f"recorded their teacher): move the folder away to train the run anew")
        stored = {**flatten_config(self.resumed_config), "teacher": saved["teacher"]}
        current = {**flatten_config(self.cfg.to_dict()), "teacher": self.teacher_path}
        differ = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
        if differ:
            raise EvaluationError(f"{self.resumed_from} is the checkpoint of another run (it differs in "
                                  f"{', '.join(differ[:8])}): continuing it would mix two runs in one record; "
                                  f"move the folder away or give another --resume-dir")
        self.state.losses = list(saved["losses"])
        self.state.eval_losses = [tuple(x) for x in saved["eval_losses"]]
        self.grad_norms, self.ranks = list(saved["grad_norms"]), list(saved["ranks"])
        self.eval_at_start = saved["eval_at_start"]
        self.spectrum = SpectrumLog.from_state(saved["spectrum"]) if saved["spectrum"] else None
        self.seconds_before = float(saved["seconds"])

    def _save_if_new(self):
        """A finished run is measured in this process: no checkpoint of it (only a stop saves)."""
        if self.state.step >= self.cfg.train.steps:
            return None
        return super()._save_if_new()

    def _spectra(self, step: int) -> List[torch.Tensor]:
        with quant_context(aux_gate=self.schedule.gate_at(max(step - 1, 0))):
            return aux_spectra(self.student)

    def _one_step(self, num_micro):
        super()._one_step(num_micro)
        step = self.state.step
        if self.spectrum and (step % self.spectrum_interval == 0 or step == self.cfg.train.steps):
            self.spectrum.record(step, self._spectra(step))

    def eval_curve(self) -> List:
        start = [(0, self.eval_at_start)] if self.eval_at_start is not None else []
        return start + [list(x) for x in self.state.eval_losses]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--method", required=True, choices=("ptq", "lsq", "qvgen", "qvgen_keep_aux", "decay_all"))
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--spectrum-interval", type=int, default=5)
    parser.add_argument("--resume-dir", default=None,
                        help="the run's checkpoint folder: a stop signal saves there (exit status 75) and the same "
                             "command continues from it")
    args, rest = parser.parse_known_args(argv)
    from megatron_qvgen import cli

    cli.quiet_console()
    from megatron_qvgen.config import ConfigError, parse_override_args
    from megatron_qvgen.fidelity import report
    from megatron_qvgen.fidelity.pipeline import EvalOptions
    from megatron_qvgen.fidelity.session import close_single_process, open_single_process

    try:
        cfg = study_config(args.recipe, args.method, args.bits, args.seed, parse_override_args(rest))
        if args.resume_dir:   # saved only when a signal stops it
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(
                cfg.train, save_dir=args.resume_dir, save_interval=0, save_interval_minutes=0.0, keep_last=1))
        options = EvalOptions(samples=args.samples, sampling_steps=args.sampling_steps, seed=0)
        with _stop_signals_ignored():   # to the record on disk (the trainer's own handlers excepted, run_study)
            open_single_process(seed=args.seed)
            try:
                record = run_study(args.teacher, cfg, args.method, options, args.spectrum_interval)
            finally:
                close_single_process()
            report.write_json(args.json, record)
            if args.resume_dir:
                mark_finished(args.resume_dir, args.json)
    except RunStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except (EvaluationError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    f = record["fidelity"]
    print(f"{args.method} {record['bits']} seed {args.seed}: rel_l2 {f['rel_l2']:.4f} psnr {f['psnr_db']:.2f} dB "
          f"({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
