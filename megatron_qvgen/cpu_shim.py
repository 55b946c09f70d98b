"""Run megatron-core on a machine without a GPU.

megatron-core calls CUDA in hundreds of places even with ``use_cpu_initialization``. This module maps
those calls onto the CPU so that megatron's REAL collectives (gloo), pipeline schedules, optimizer and
dist_checkpointing run unchanged in CPU tests. It is applied only when ``torch.cuda.is_available()`` is
False, is idempotent, and touches exactly the names listed in :data:`PATCHED_TORCH_CUDA` and
:data:`PATCHED_MEGATRON` (a test checks that each still exists in the pinned megatron-core).

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
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

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

        import importlib

        for module_name, attr in PATCHED_MEGATRON:
            module = importlib.import_module(module_name)
            getattr(module, attr)  # fail loudly if the pinned megatron renamed it
        random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
        random_mod._get_cuda_rng_state = _cpu_rng_get
        random_mod._set_cuda_rng_state = _cpu_rng_set
        logging.getLogger(random_mod.__name__).addFilter(_QuietRngFork())

        _mode = _CudaToCpuMode()
        _mode.__enter__()
    return True
