"""Runs a Gluon kernel for Hopper on the CPU, one program at a time, and fails on the bugs a GPU would hang or race on.

Gluon has no interpreter, so a kernel written in it (kernels/qvgen_kernels/attention_gluon.py) could otherwise only
be checked on a lent GPU. This executes the kernel's Python source with the Gluon names it uses bound to torch
emulations, one program of the grid after another, and models what the hardware makes asynchronous:

- TMA copies land in shared memory only when a wait on their mbarrier completes the phase they were counted in;
  a product or load that reads a slot before that is a read-after-write race and raises.
- mbarriers keep their arrival count, transaction bytes and phase. ``wait(bar, parity)`` returns at once when the
  phase of that parity is already complete (the hardware rule: waiting for parity 1 on a fresh barrier does not
  wait), and raises when the phase it waits for can never complete (a hang on the GPU).
- ``warpgroup_mma(is_async=True)`` returns a token; products complete in issue order, only through
  ``warpgroup_mma_wait(n)``, and read their shared-memory operands when they complete, so a TMA issued into a
  slot that an outstanding product reads is a write-after-read race and raises.
- With more than one warp group (``num_warps`` > 4), each waits for its own products: a slot its products read is
  free for a TMA copy only after a ``thread_barrier`` has followed the wait, else another warp group may still
  be reading it (the program runs as one thread of control, so this is checked as an ordering rule).
- Pointer loads and stores check every unmasked address against the extent of the tensor they point into.

What it does not model: warps running apart other than the rule above, layouts, the shared-memory layouts of TMA
descriptors and register limits (the compiler's; benchmarks/runtime/sm90_report.py reads those), and timing.
Arithmetic is torch's on the CPU in the kernel's dtypes: integer results are exact as on the GPU; float ones
differ by rounding (no fused multiply-adds here), and fp8 products are summed exactly, where Hopper's fp8 tensor
cores keep about 22 bits, so fp8 results agree to the precision of their fp8 operands, not bit for bit.
"""
from __future__ import annotations

import math
import types
from typing import Any, Optional

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
        self.released = {}   # slot -> True: its products waited for, but no thread_barrier since (several groups)

    def index(self, i):
        return SharedView(self, int(i), None)

    def permute(self, order):
        return SharedView(self, None, tuple(order))

    @property
    def shape(self):
        return list(self.data.shape)

    def _overlaps(self, slot, table):
        return [k for k, v in table.items() if v and (k is None or slot is None or k == slot)]


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

    def check_readable(self, what: str):
        if self.mem._overlaps(self.slot, self.mem.writes):
            raise GluonEmulationError(f"{what} reads {self.where()} while a TMA copy into it is in flight "
                                      "(no mbarrier wait completed its phase)")


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

    def complete(self):
        """Land this phase's copies; finish the phase if its arrivals and bytes are all in, else report a hang."""
        for view, data, nbytes in self.copies:
            view.mem.data[view.slot if view.slot is not None else slice(None)] = data
            view.mem.writes.pop(view.slot, None)
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


# ----------------------------------------------------------------------------------------------------------------
# The emulated Gluon namespaces
# ----------------------------------------------------------------------------------------------------------------

class _Layout:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _Unsupported:
    def __init__(self, name):
        self.name = name

    def __getattr__(self, attr):
        raise GluonEmulationError(f"{self.name}.{attr} is not emulated (tests/gluon_emulator.py)")

    def __call__(self, *args, **kwargs):
        raise GluonEmulationError(f"{self.name} is not emulated (tests/gluon_emulator.py)")


class _Namespace:
    """Only what is defined here exists; anything else raises naming itself."""

    def __init__(self, name, **members):
        self._name = name
        self.__dict__.update(members)

    def __getattr__(self, attr):
        raise GluonEmulationError(f"{self._name}.{attr} is not emulated (tests/gluon_emulator.py)")


class Program:
    """One program of the grid: its ids, its shared memory and barriers, its outstanding products."""

    def __init__(self, pid, num_warps: int = 4):
        self.pid = pid
        self.warp_groups = max(1, num_warps // 4)
        self.outstanding = []
        self.barriers = []
        self.memories = []
        self.n_alloc = 0

    # -- gl, and tl for the Triton functions a Gluon kernel calls ------------------------------------------------
    def gl(self):
        return _Namespace("gl", **self._language())

    def tl(self):
        return _Namespace("tl", cdiv=lambda a, b: (a + b - 1) // b, **self._language())

    def _language(self):
        def program_id(axis):
            return _reg(torch.tensor(self.pid[axis], dtype=torch.int32))

        def allocate_shared_memory(dtype, shape, layout, value=None):
            if value is not None:
                raise GluonEmulationError("allocate_shared_memory(value=...) is not emulated")
            self.n_alloc += 1
            name = f"smem{self.n_alloc}"
            if isinstance(layout, _MBarrierLayout):
                shape = list(shape)
                if shape == [1]:
                    bar = Barrier(self, f"barrier{self.n_alloc}")
                    self.barriers.append(bar)
                    return bar
                arr = BarrierArray(self, shape[0], f"barriers{self.n_alloc}")
                self.barriers += arr.barriers
                return arr
            mem = SharedMemory(self, dtype, list(shape), name)
            self.memories.append(mem)
            return mem

        def arange(start, end, layout=None):
            return _reg(torch.arange(start, end, dtype=torch.int32))

        def full(shape, value, dtype, layout=None):
            return _reg(torch.full(list(shape), value, dtype=dtype))

        def zeros(shape, dtype, layout=None):
            return _reg(torch.zeros(list(shape), dtype=dtype))

        def load(ptr, mask=None, other=None, **kwargs):
            if not isinstance(ptr, Pointer):
                raise GluonEmulationError(f"gl.load of {type(ptr).__name__}")
            off, m = ptr._addresses(mask)
            vals = torch.where(m, ptr.tensor[off], torch.as_tensor(0 if other is None else other).to(ptr.tensor.dtype))
            return _reg(vals)

        def store(ptr, value, mask=None, **kwargs):
            off, m = ptr._addresses(mask)
            value = _plain(_reg(value).to(ptr.tensor.dtype)).expand(off.shape)      # fp8: saturating, as cvt
            ptr.tensor[off[m]] = value[m]

        def reduce(fn):          # an integer reduction stays in its dtype (int32 sums wrap, as Triton's do)
            return lambda x, axis=None, keep_dims=False: _reg(fn(_plain(x), dim=axis, keepdim=keep_dims)
                                                              .to(_plain(x).dtype))

        def static_assert(cond, msg=""):
            if not cond:
                raise GluonEmulationError(f"static_assert failed: {msg}")

        return dict(
            program_id=program_id, allocate_shared_memory=allocate_shared_memory, arange=arange, full=full,
            zeros=zeros, load=load, store=store, static_assert=static_assert, static_range=range,
            where=lambda c, x, y: _reg(torch.where(_plain(_reg(c)), _plain(_reg(x)), _plain(_reg(y)))),
            maximum=lambda x, y: _reg(torch.maximum(_plain(_reg(x)), _plain(_reg(y)))),
            minimum=lambda x, y: _reg(torch.minimum(_plain(_reg(x)), _plain(_reg(y)))),
            max=reduce(torch.amax), min=reduce(torch.amin), sum=reduce(torch.sum),
            exp2=lambda x: _reg(torch.exp2(_plain(x))), exp=lambda x: _reg(torch.exp(_plain(x))),
            expand_dims=lambda x, axis: _reg(_plain(x).unsqueeze(axis)),
            split=lambda x: tuple(_reg(t) for t in _plain(x).unbind(-1)),
            join=lambda a, b: _reg(torch.stack([_plain(a), _plain(b)], -1)),
            math=_Namespace("math", exp2=lambda x: _reg(torch.exp2(_plain(x)))),
            convert_layout=lambda x, layout, **kw: x, thread_barrier=self.thread_barrier,
            NVMMADistributedLayout=_Layout, DotOperandLayout=_Layout, SliceLayout=_Layout, BlockedLayout=_Layout,
            NVMMASharedLayout=_Layout,
            float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16, float8e4nv=torch.float8_e4m3fn,
            int8=torch.int8, int32=torch.int32, int64=torch.int64)

    def thread_barrier(self):
        for mem in self.memories:
            mem.released.clear()

    # -- mbarrier, tma, wgmma -------------------------------------------------------------------------------------
    def mbarrier(self):
        def init(bar, count):
            if bar.count is not None and not bar.invalid:
                raise GluonEmulationError(f"mbarrier.init of {bar.name}, already initialized")
            bar.count, bar.invalid, bar.fenced, bar.arrivals, bar.tx, bar.phase = count, False, False, 0, 0, 0

        def expect(bar, nbytes, pred=True):
            if bool(pred):
                bar._live("mbarrier.expect")
                bar.arrive("mbarrier.expect")         # arrive.expect_tx: one arrival and the bytes to come
                bar.tx += int(nbytes)

        def arrive(bar, *, count=1, pred=True):
            if bool(pred):
                bar._live("mbarrier.arrive")
                for _ in range(count):
                    bar.arrive("mbarrier.arrive")

        def wait(bar, phase, pred=True, deps=()):
            if not bool(pred):
                return
            bar._live("mbarrier.wait")
            if (bar.phase & 1) != (int(phase) & 1):
                return                                 # the phase of that parity is the completed previous one
            bar.complete()

        def invalidate(bar):
            bar._live("mbarrier.invalidate")
            if bar.copies or bar.arrivals:
                raise GluonEmulationError(f"mbarrier.invalidate of {bar.name} with {len(bar.copies)} TMA copies "
                                          f"and {bar.arrivals} arrivals of an unfinished phase")
            bar.invalid = True

        return _Namespace("mbarrier", init=init, expect=expect, arrive=arrive, wait=wait, invalidate=invalidate,
                          MBarrierLayout=_MBarrierLayout)

    def tma(self):
        def async_copy_global_to_shared(desc, coord, bar, result, pred=True):
            if not bool(pred):
                return
            bar._live("tma.async_copy_global_to_shared")
            view = result if isinstance(result, SharedView) else SharedView(result, None, None)
            if view.order is not None:
                raise GluonEmulationError("TMA copy into a permuted view")
            busy = view.mem._overlaps(view.slot, view.mem.reads)
            if busy:
                raise GluonEmulationError(f"TMA copy into {view.where()} while an outstanding warpgroup_mma reads "
                                          "it (wait for the product before refilling the slot)")
            if view.mem._overlaps(view.slot, view.mem.writes):
                raise GluonEmulationError(f"TMA copy into {view.where()} while another copy into it is in flight")
            if view.mem._overlaps(view.slot, view.mem.released):
                raise GluonEmulationError(f"TMA copy into {view.where()} after this warp group's wait for the products "
                                          f"reading it but before a thread_barrier: with {self.warp_groups} warp "
                                          "groups another may still be reading it")
            data = desc.block([int(c) for c in coord])
            if list(data.shape) != list(view.value().shape) or data.dtype != view.mem.data.dtype:
                raise GluonEmulationError(f"TMA block {tuple(data.shape)} {data.dtype} into {view.where()} "
                                          f"{tuple(view.value().shape)} {view.mem.data.dtype}")
            view.mem.writes[view.slot] = bar
            bar.copies.append((view, data, desc.block_type.nbytes))

        return _Namespace("tma", async_copy_global_to_shared=async_copy_global_to_shared)

    def warpgroup_mma(self, a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None,
                      is_async=False):
        a, b = (SharedView(x, None, None) if isinstance(x, SharedMemory) else x for x in (a, b))
        for x in (a, b):
            if isinstance(x, SharedView):
                x.check_readable("warpgroup_mma")
        if not is_async:           # a synchronous product waits for every group in flight, then for itself
            self.warpgroup_mma_wait(0, deps=[])
            return _product(a, b, acc if bool(use_acc) else None)
        tok = MMAToken(a, b, bool(use_acc), acc)
        for x in (a, b):
            if isinstance(x, SharedView):
                x.mem.reads.setdefault(x.slot, set()).add(tok)
        self.outstanding.append(tok)
        return tok

    def warpgroup_mma_wait(self, num_outstanding=0, deps=None):
        if deps is None:
            raise GluonEmulationError("warpgroup_mma_wait deps must be given")
        while len(self.outstanding) > num_outstanding:
            tok = self.outstanding.pop(0)              # groups complete in the order they were issued
            tok.compute()
            for x in (tok.a, tok.b):
                if isinstance(x, SharedView):
                    x.mem.reads[x.slot].discard(tok)
                    if self.warp_groups > 1:
                        x.mem.released[x.slot] = True
        # a product still in flight comes back as its token: it may only be chained or waited for again
        results = [d.result if isinstance(d, MMAToken) and d.result is not None else d for d in deps]
        return results[0] if len(results) == 1 else tuple(results)

    def finish(self):
        if self.outstanding:
            raise GluonEmulationError(f"program {self.pid} exits with {len(self.outstanding)} warpgroup_mma in flight")
        for bar in self.barriers:
            if bar.copies:
                raise GluonEmulationError(f"program {self.pid} exits with TMA copies on {bar.name} never waited for")


class _MBarrierLayout(_Layout):
    pass


def _bind(jit_fn, program: Program, cache: dict):
    """The kernel's Python function with its Gluon names (and the jitted helpers it calls) bound to ``program``."""
    from triton.experimental.gluon import language as real_gl
    from triton.experimental.gluon.language.nvidia import hopper as real_hopper
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier as real_mbarrier, tma as real_tma
    import triton.language as real_tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    fn = jit_fn.fn
    if fn in cache:
        return cache[fn]
    replace = {id(real_gl): program.gl(), id(real_tl): program.tl(), id(real_mbarrier): program.mbarrier(),
               id(real_tma): program.tma(),
               id(real_hopper.warpgroup_mma): program.warpgroup_mma,
               id(real_hopper.warpgroup_mma_wait): program.warpgroup_mma_wait,
               id(real_hopper.fence_async_shared): lambda: [setattr(b, "fenced", True) for b in program.barriers]}
    env = {}
    bound = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    cache[fn] = bound
    for name, value in fn.__globals__.items():
        if id(value) in replace:
            env[name] = replace[id(value)]
        elif isinstance(value, (JITFunction, InterpretedFunction)):     # Triton functions too (interpreter or not)
            env[name] = _bind(value, program, cache)
        elif (getattr(value, "__module__", "") or getattr(value, "__name__", "")).startswith("triton"):
            env[name] = _Unsupported(name)
        else:
            env[name] = value
    env["__builtins__"] = fn.__globals__["__builtins__"]
    return bound


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


def emulate(jit_fn, grid, *args, **kwargs) -> None:
    """``jit_fn[grid](*args, **kwargs)`` on the CPU, program by program (see the module docstring)."""
    from triton.tools.tensor_descriptor import TensorDescriptor as TritonDescriptor
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    num_warps = kwargs.get("num_warps", 4)
    kwargs = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    names = list(jit_fn.arg_names)

    def device_arg(name, a):
        if isinstance(a, (GluonDescriptor, TritonDescriptor)):
            return DeviceDescriptor(a, name)
        if isinstance(a, torch.Tensor):
            if a.is_cuda:
                raise ValueError("emulate runs on CPU tensors")
            return Pointer.of(a, name)
        return a

    args = [device_arg(n, a) for n, a in zip(names, args)]
    kwargs = {k: device_arg(k, v) for k, v in kwargs.items()}
    grid = tuple(grid) + (1,) * (3 - len(grid))
    for pz in range(grid[2]):
        for py in range(grid[1]):
            for px in range(grid[0]):
                program = Program((px, py, pz), num_warps)
                _bind(jit_fn, program, {})(*args, **kwargs)
                program.finish()
