"""What every entry point (train, fit_teacher, tools/) does alike: a quiet console and one-line user errors.

- :func:`quiet_console` before megatron is imported: our own loggers (``megatron_qvgen.*``) speak at INFO,
  everything else only from WARNING (megatron logs every DDP bucket's parameter list and each config at INFO),
  and the warnings and log records that say nothing a user can act on (no Transformer Engine / Apex on a
  machine that does not need them, a deprecation inside torch that megatron calls, megatron 0.19's notice on
  every synchronous save) are dropped, each by its own message.
- :func:`run` calls an entry point's body: a :data:`user error <user_error_types>` (a bad flag, a missing
  path, a refused resume) becomes ONE line ``error: ...`` on stderr and exit status 1 (2 for a config
  error), without a traceback. Under torchrun every rank usually raises the same error (they read the same
  flags and files), so only rank 0 prints it; a rank > 0 that hits an error alone prints it after a grace
  period, by which time torchrun has stopped it if rank 0 failed too. Any other exception keeps its
  traceback: then the code, not the user, is at fault.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import warnings
from typing import Callable, Optional, Tuple, Type

from megatron_qvgen.config.errors import ConfigError, UserError

# (category, message regex) of warnings nobody can act on; each with the reason it is noise.
_NOISE_WARNINGS = (
    # Transformer Engine / Apex are optional GPU accelerations; megatron's fallbacks are what we test.
    (UserWarning, r".*(Transformer Engine|Apex).*not installed.*"),
    (UserWarning, r"Apex is not installed.*"),
    # quiet_console sets CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron's advice); the warning fires on CPU anyway.
    (UserWarning, r".*CUDA_DEVICE_MAX_CONNECTIONS.*"),
    # megatron calls torch's deprecated all_gather_into_tensor; nothing to change on our side.
    (FutureWarning, r".*all_gather_into_tensor.* is deprecated.*"),
    # The export and conversion tools read dist checkpoints in one process on purpose (no process group).
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                  r"in a single process"),
    # megatron calls DCP's deprecated load_state_dict; nothing to change on our side.
    (FutureWarning, r".*load_state_dict.*"),
    # megatron-core 0.19 warns at import about a multimodal model class this project never uses.
    (UserWarning, r"MimoModelConfig is experimental.*"),
)
# (logger, message start) of megatron log records at WARNING that are noise here, each with the reason.
_NOISE_LOGS = (
    # megatron-core 0.19 logs this on every SYNCHRONOUS save (its sync path runs the deprecated async code).
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    # torch on a CUDA image with the GPUs hidden (CUDA_VISIBLE_DEVICES=): printed ahead of every one-line error
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropMessages(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)
# A rank > 0 waits this long before printing its user error (see the module docstring).
NONZERO_RANK_GRACE_S = 30.0   # long enough for torchrun to notice rank 0 exit on a loaded machine


def recipe_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--recipe NAME``, whose ``--help`` lists the recipes and what each is."""
    from megatron_qvgen.recipes import recipe_names
    from megatron_qvgen.recipes.registry import recipe_summary

    names = recipe_names()
    epilog = ("recipes:\n" + "\n".join(f"  {name:<16}{recipe_summary(name)}" for name in names)
              + "\n\nAny config field: --section.field value (e.g. --train.steps 200); --print-config shows them.")
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, metavar="NAME", help=f"one of: {', '.join(names)}")
    return parser


def quiet_console(level: int = logging.INFO) -> None:
    """Our INFO on stderr, third-party loggers from WARNING; call before importing megatron."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    for category, message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    logging.getLogger("megatron_qvgen").setLevel(level)
    for name, start in _NOISE_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessages(start))


def global_rank() -> int:
    """This process's rank from the launcher's environment (torchrun, or srun without it); 0 alone."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def world_size() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def user_error_types() -> Tuple[Type[BaseException], ...]:
    """The project's errors a user causes and can fix (each message names the thing and the remedy)."""
    from megatron_qvgen.data.errors import DatasetError
    from megatron_qvgen.dist_ckpt import CheckpointError   # includes convert's ConversionError
    from qvgen_kernels.format import ExportFormatError

    return (UserError, DatasetError, CheckpointError, ExportFormatError)


def report_user_error(exc: BaseException, rank: Optional[int] = None) -> None:
    """Print ``error: <message>`` on one line, once per run (see the module docstring)."""
    rank = global_rank() if rank is None else rank
    line = "error: " + " ".join(str(exc).split())   # one line, whatever the message holds
    if rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # torchrun's stop must end the wait, not a handler
        time.sleep(NONZERO_RANK_GRACE_S)
        line = f"[rank {rank}] {line}"
    print(line, file=sys.stderr, flush=True)


def run(body: Callable[[], int]) -> int:
    """``body()``'s exit status; a user error -> one line and 2 (config) or 1 (anything else)."""
    try:
        return body()
    except user_error_types() as exc:
        report_user_error(exc)
        return 2 if isinstance(exc, ConfigError) else 1
