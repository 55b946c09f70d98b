"""Run megatron-core on a machine without a GPU.

megatron-core calls CUDA in hundreds of places even with ``use_cpu_initialization``. This module maps
those calls onto the CPU so that megatron's REAL collectives (gloo), pipeline schedules, optimizer and
dist_checkpointing run unchanged in CPU tests. It is applied only when ``torch.cuda.is_available()`` is
False, is idempotent, and touches exactly the names listed in :data:`PATCHED_TORCH_CUDA` and
:data:`PATCHED_MEGATRON`. Before patching, :func:`check_megatron` checks that each of them exists: on a
megatron-core that renamed one, the shim stops with the version, the missing name and the versions it was
tested with (:data:`TESTED_MEGATRON`), instead of a silent no-op (a missing RNG hook gives TP ranks identical
dropout masks without any error). A version outside that list whose names are all present gets one warning.

megatron-core 0.18+ imports triton unconditionally (install it: setup.py requires it on Linux; never fake a
``triton`` module, torch's inductor then breaks); 0.19's async checkpoint save needs nvidia-resiliency-ext,
which this project does not use (its saves are synchronous).

What it covers:
- ``torch.cuda`` device/stream/event/memory queries -> CPU answers or no-ops;
- the device RNG -> the CPU default generator, including megatron's module-level
  ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``; without the latter the
  RNG tracker's ``fork()`` is a silent no-op and TP ranks draw identical dropout masks;
- a ``TorchFunctionMode`` that sends ``device="cuda"``, ``.to("cuda")`` and ``.cuda()`` to the CPU and
  reports CPU float tensors' ``.type()`` with CUDA type strings (megatron's optimizer checks them).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import re
import threading
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

from megatron_qvgen.config.errors import UserError

PATCHED_TORCH_CUDA = (
    "current_device", "synchronize", "current_stream", "default_stream", "stream", "Stream", "Event",
    "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "empty_cache",
    "memory_allocated", "max_memory_allocated", "memory_reserved", "reset_peak_memory_stats",
    "device_count", "set_device",
)
PATCHED_MEGATRON = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
)

# megatron-core versions the CPU test suite ran against with this shim: 0.16.1 in CI (Python 3.11), 0.19.2 on the
# GPU image with CUDA hidden (Python 3.12; benchmarks/training/RESULTS.md).
TESTED_MEGATRON = ("0.16.1", "0.19.2")


class MegatronVersionError(UserError, RuntimeError):
    """The installed megatron-core lacks a private name the CPU shim patches."""


_lock = threading.Lock()
_mode: "_CudaToCpuMode | None" = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


class _NullStream:
    """Stands in for a CUDA stream: every operation is already ordered on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device=torch.device("cpu"))
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu")) + tuple(args[2:])
        elif func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                name = _CUDA_TYPE_NAMES.get(args[0].dtype)
                if name is not None and args[0].device.type == "cpu":
                    return name
            elif len(args) > 1 and isinstance(args[1], str):
                args = (args[0], args[1].replace("torch.cuda.", "torch.")) + tuple(args[2:])
        return func(*args, **kwargs)


def _cpu_rng_get(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


def _cpu_seed(seed):
    torch.default_generator.manual_seed(int(seed))


class _QuietRngFork(logging.Filter):
    """The tracker's fork warns when the CPU RNG moved inside it; on CPU that RNG IS the device RNG."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def megatron_version() -> str:
    import megatron.core

    return str(getattr(megatron.core, "__version__", "unknown"))


def _release(version: str) -> str:
    """``0.19.2rc1+abc`` -> ``0.19.2``: the release a build belongs to."""
    match = re.match(r"\d+\.\d+\.\d+", version)
    return match.group(0) if match else version


def check_megatron(version: Optional[str] = None,
                   names: Sequence[Tuple[str, str]] = PATCHED_MEGATRON) -> str:
    """Every name the shim patches must exist; returns megatron-core's version (see the module docstring)."""
    version = version or megatron_version()
    tested = ", ".join(TESTED_MEGATRON)
    for attr in PATCHED_TORCH_CUDA:
        if not hasattr(torch.cuda, attr):
            raise MegatronVersionError(f"torch {torch.__version__}: the CPU shim patches torch.cuda.{attr}, which "
                                       "this torch does not have")
    for module_name, attr in names:
        try:
            present = hasattr(importlib.import_module(module_name), attr)
        except ModuleNotFoundError as exc:
            if not exc.name or not module_name.startswith(exc.name):
                raise   # a dependency of megatron is missing, not the module the shim patches
            present = False
        if not present:
            raise MegatronVersionError(
                f"megatron-core {version}: the CPU shim (megatron_qvgen/cpu_shim.py) patches {module_name}.{attr}, "
                f"which this version does not have; the shim is tested with megatron-core {tested}: install one "
                "of those to run without a GPU (on a GPU the shim is not used)")
    if _release(version) not in TESTED_MEGATRON:
        warnings.warn(f"megatron-core {version} has not been tested with the CPU shim (tested: {tested}); the names "
                      "it patches are present, continuing", stacklevel=2)
    return version


def is_applied() -> bool:
    return _mode is not None


def apply() -> bool:
    """Install the shim if there is no GPU. Returns True when the shim is (now) active."""
    global _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _mode is not None:
            return True
        check_megatron()
        cuda = torch.cuda
        cuda.current_device = lambda: torch.device("cpu")
        cuda.synchronize = lambda *a, **k: None
        cuda.current_stream = lambda *a, **k: _NullStream()
        cuda.default_stream = lambda *a, **k: _NullStream()
        cuda.stream = lambda *a, **k: contextlib.nullcontext()
        cuda.Stream = _NullStream
        cuda.Event = _NullEvent
        cuda.get_rng_state = _cpu_rng_get
        cuda.set_rng_state = _cpu_rng_set
        cuda.random.get_rng_state = _cpu_rng_get
        cuda.random.set_rng_state = _cpu_rng_set
        cuda.manual_seed = _cpu_seed
        cuda.manual_seed_all = _cpu_seed
        cuda.empty_cache = lambda: None
        cuda.memory_allocated = lambda *a, **k: 0
        cuda.max_memory_allocated = lambda *a, **k: 0
        cuda.memory_reserved = lambda *a, **k: 0
        cuda.reset_peak_memory_stats = lambda *a, **k: None
        cuda.device_count = lambda: 0
        cuda.set_device = lambda *a, **k: None

        random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
        random_mod._get_cuda_rng_state = _cpu_rng_get
        random_mod._set_cuda_rng_state = _cpu_rng_set
        logging.getLogger(random_mod.__name__).addFilter(_QuietRngFork())

        _mode = _CudaToCpuMode()
        _mode.__enter__()
    return True
