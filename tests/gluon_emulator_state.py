"""What tests/gluon_emulator.py models of a Hopper GPU: register tensors, global memory through pointers and TMA
descriptors, shared memory with its in-flight copies and reads, mbarriers, and asynchronous products."""
from __future__ import annotations

import math
from typing import Optional

import torch

FP8_MAX = 448.0


class GluonEmulationError(RuntimeError):
    """A race, hang, out-of-bounds access or unsupported operation found while emulating a Gluon kernel."""


class ETensor(torch.Tensor):
    """A register tensor: torch arithmetic plus Gluon's ``.to(dtype, bitcast=...)`` and saturating fp8 casts."""

    def to(self, *args, bitcast: bool = False, **kwargs):
        dtype = args[0] if args and isinstance(args[0], torch.dtype) else kwargs.get("dtype")
        if bitcast:
            return self.view(dtype)
        if dtype == torch.float8_e4m3fn:          # cvt.rn.satfinite: out-of-range values clamp to +-448
            return torch.Tensor.to(torch.Tensor.clamp(self, -FP8_MAX, FP8_MAX), dtype)
        return torch.Tensor.to(self, *args, **kwargs)


def _reg(x) -> ETensor:
    if isinstance(x, MMAToken):
        x = x.value()
    return x if isinstance(x, ETensor) else torch.as_tensor(x).as_subclass(ETensor)


def _plain(x):
    if isinstance(x, MMAToken):
        x = x.value()
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


# ----------------------------------------------------------------------------------------------------------------
# Global memory: pointers and tensor descriptors
# ----------------------------------------------------------------------------------------------------------------

class _ElementType:
    def __init__(self, dtype):
        self.element_ty = dtype


class Pointer:
    """A tensor argument: a flat view of its storage from its first element, plus element offsets."""

    def __init__(self, tensor: torch.Tensor, offset=0, name: str = "pointer"):
        if tensor.dim() != 1 or tensor.stride(0) != 1:
            raise ValueError("Pointer wants a flat tensor; use Pointer.of")
        self.tensor, self.offset, self.name = tensor, offset, name

    @classmethod
    def of(cls, t: torch.Tensor, name: str) -> "Pointer":
        """From the tensor's first element to its last (its extent, not the rest of a larger storage)."""
        n = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
        return cls(torch.as_strided(t, (n,), (1,), t.storage_offset()), 0, name)

    @property
    def dtype(self):
        return _ElementType(self.tensor.dtype)

    def __add__(self, other):
        return Pointer(self.tensor, self.offset + other, self.name)

    __radd__ = __add__

    def _addresses(self, mask):
        """Offsets and mask broadcast together; every unmasked offset checked against the tensor."""
        off = _plain(_reg(self.offset)).to(torch.int64)
        m = torch.ones((), dtype=torch.bool) if mask is None else _plain(_reg(mask)).to(torch.bool)
        off, m = torch.broadcast_tensors(off, m)
        live, n = off[m], self.tensor.numel()
        if live.numel() and (live.min() < 0 or live.max() >= n):
            raise GluonEmulationError(f"out-of-bounds access through {self.name}: offsets {int(live.min())}.."
                                      f"{int(live.max())} of {n} elements")
        return off.clamp(0, max(n - 1, 0)), m


class DeviceDescriptor:
    """The kernel's view of a host ``TensorDescriptor``: its block type, and the TMA copy of one block."""

    class _BlockType:
        def __init__(self, shape, dtype):
            self.shape = list(shape)
            self.nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def __init__(self, host, name: str):
        self.host, self.name = host, name
        self.dtype = host.base.dtype
        self.layout = host.layout
        self.block_type = self._BlockType(host.block_shape, self.dtype)
        base = host.base
        self.view = torch.as_strided(base, list(host.shape), list(host.strides), base.storage_offset())

    def block(self, coord) -> torch.Tensor:
        """The block at ``coord``; elements outside the tensor read as zero (TMA's padding)."""
        if self.host.padding != "zero":
            raise GluonEmulationError(f"{self.name}: only zero padding is emulated")
        out = torch.zeros(self.block_type.shape, dtype=self.dtype)
        src, dst = [], []
        for c, b, n in zip(coord, self.block_type.shape, self.view.shape):
            lo, hi = max(c, 0), min(c + b, n)
            if hi <= lo:
                return out
            src.append(slice(lo, hi))
            dst.append(slice(lo - c, hi - c))
        out[tuple(dst)] = self.view[tuple(src)]
        return out


# ----------------------------------------------------------------------------------------------------------------
# Shared memory, mbarriers, asynchronous products
# ----------------------------------------------------------------------------------------------------------------

class SharedMemory:
    """An allocation; ``index(i)`` and ``permute`` give views. Tracks in-flight TMA writes and product reads."""

    def __init__(self, program, dtype, shape, name):
        self.program, self.data, self.name = program, torch.zeros(shape, dtype=dtype), name
        self.writes = {}     # slot (None: the whole allocation) -> the barrier its TMA copy counts on
        self.reads = {}      # slot -> set of outstanding product tokens
        self.released = {}   # slot -> partitions (of several warp groups) past their wait, not yet past a barrier
        self.landed = {}     # slot -> (barrier, completed phases after which its content is valid)

    def index(self, i):
        return SharedView(self, int(i), None)

    def permute(self, order):
        return SharedView(self, None, tuple(order))

    @property
    def shape(self):
        return list(self.data.shape)

    def _overlaps(self, slot, table):
        return [k for k, v in table.items() if v and (k is None or slot is None or k == slot)]

    def release(self, slot, partition):
        self.released.setdefault(slot, set()).add(partition)

    def barrier_passed(self, partition):
        for waiting in self.released.values():
            waiting.discard(partition)


class SharedView:
    def __init__(self, mem: SharedMemory, slot: Optional[int], order):
        self.mem, self.slot, self.order = mem, slot, order

    def permute(self, order):
        if self.order is not None:
            raise GluonEmulationError("permute of a permuted view is not emulated")
        return SharedView(self.mem, self.slot, tuple(order))

    def where(self) -> str:
        return self.mem.name + ("" if self.slot is None else f"[{self.slot}]")

    def value(self) -> torch.Tensor:
        t = self.mem.data if self.slot is None else self.mem.data[self.slot]
        return t.permute(self.order) if self.order is not None else t

    def check_readable(self, what: str, partition):
        """The content must have landed, through a barrier phase this reading partition has itself waited for."""
        if self.mem._overlaps(self.slot, self.mem.writes):
            raise GluonEmulationError(f"{what} reads {self.where()} while a TMA copy into it is in flight "
                                      "(no mbarrier wait completed its phase)")
        landed = self.mem.landed.get(self.slot) or self.mem.landed.get(None)
        if landed is None:
            raise GluonEmulationError(f"{what} reads {self.where()}, which no TMA copy has filled")
        bar, phases = landed
        if partition.seen.get(bar, 0) < phases:
            raise GluonEmulationError(f"{what} reads {self.where()} without having waited on {bar.name} for the "
                                      "copy that filled it (another partition's wait does not order this one)")


class Barrier:
    def __init__(self, program, name):
        self.program, self.name = program, name
        self.count = None        # arrivals a phase needs; None until init
        self.arrivals = self.tx = self.phase = 0
        self.copies = []         # (view, data, nbytes) of TMA copies counted on the current phase
        self.fenced = False
        self.invalid = False

    def _live(self, what):
        if self.count is None or self.invalid:
            raise GluonEmulationError(f"{what} on {self.name}, which is not initialized")
        if not self.fenced:
            raise GluonEmulationError(f"{what} on {self.name} before fence_async_shared() made its init visible "
                                      "to the async proxy")

    def arrive(self, what):
        self.arrivals += 1
        if self.arrivals > self.count:
            raise GluonEmulationError(f"{what}: {self.name} gets arrival {self.arrivals} of {self.count} in phase "
                                      f"{self.phase}: re-armed before a wait completed its phase")
        if self.arrivals == self.count and self.tx == 0 and not self.copies:     # nothing in flight: done now
            self.phase += 1
            self.arrivals = 0

    def can_complete(self) -> bool:
        """Whether landing the copies in flight would complete the current phase."""
        return self.arrivals == self.count and self.tx == sum(n for _, _, n in self.copies)

    def complete(self):
        """Land this phase's copies; finish the phase if its arrivals and bytes are all in, else report a hang."""
        for view, data, nbytes in self.copies:
            view.mem.data[view.slot if view.slot is not None else slice(None)] = data
            view.mem.writes.pop(view.slot, None)
            view.mem.landed[view.slot] = (self, self.phase + 1)
            self.tx -= nbytes
        self.copies = []
        if self.arrivals != self.count or self.tx != 0:
            raise GluonEmulationError(f"wait on {self.name} phase {self.phase} never returns: {self.arrivals} of "
                                      f"{self.count} arrivals, {self.tx} transaction bytes outstanding")
        self.phase += 1
        self.arrivals = 0


class BarrierArray:
    def __init__(self, program, n, name):
        self.barriers = [Barrier(program, f"{name}[{i}]") for i in range(n)]

    def index(self, i):
        return self.barriers[int(i)]


class MMAToken:
    """An asynchronous product. Its value exists once a ``warpgroup_mma_wait`` has completed it; before that it can
    only be waited for or chained as the accumulator of the next product (which the hardware orders after it)."""

    def __init__(self, a, b, use_acc, acc):
        self.a, self.b, self.use_acc, self.acc = a, b, use_acc, acc
        self.result = None

    def compute(self):
        self.result = _product(self.a, self.b, self.acc if self.use_acc else None)

    def value(self):
        if self.result is None:
            raise GluonEmulationError("an asynchronous warpgroup_mma result is used before a warpgroup_mma_wait "
                                      "completed it")
        return self.result

    def _early(self, *args):
        return _reg(self)          # raises unless completed

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __getitem__ = _early

    def to(self, *args, **kwargs):
        return _reg(self).to(*args, **kwargs)


def _operand(x):
    return x.value() if isinstance(x, SharedView) else _plain(x)


def _product(a, b, acc):
    a, b = _operand(a), _operand(b)
    if a.shape[-1] != b.shape[0]:
        raise GluonEmulationError(f"warpgroup_mma shapes {tuple(a.shape)} x {tuple(b.shape)}")
    if a.dtype == torch.int8 and b.dtype == torch.int8:
        out = (a.double() @ b.double()).to(torch.int32)          # exact: |sum| < 2**53
    elif a.is_floating_point() and b.is_floating_point():
        out = (a.double() @ b.double()).to(torch.float32)
    else:
        raise GluonEmulationError(f"warpgroup_mma of {a.dtype} by {b.dtype}")
    if acc is not None:
        out = out + _plain(acc)     # a chained accumulator token was completed first: products complete in order
    return _reg(out)
