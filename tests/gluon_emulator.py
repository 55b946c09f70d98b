"""Runs a Gluon kernel for Hopper on the CPU, one program at a time, and fails on the bugs a GPU would hang or race on.

Gluon has no interpreter, so a kernel written in it (kernels/qvgen_kernels/attention_gluon.py) could otherwise only
be checked on a lent GPU. This executes the kernel's Python source with the Gluon names it uses bound to torch
emulations, one program of the grid after another, and models what the hardware makes asynchronous:

- TMA copies land in shared memory only when a wait on their mbarrier completes the phase they were counted in;
  a product that reads a slot before that, or without its own partition having waited on that phase (another
  partition's wait orders nothing for it), is a read-after-write race and raises.
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
- ``gl.warp_specialize`` runs its partitions as threads, one at a time: a partition runs until it waits on an
  mbarrier phase that has not completed, or reaches a synchronisation point (a barrier operation, a TMA copy, the
  issue of or a wait for a product), where a seeded random choice picks who runs next (and who runs first); each
  partition has its own products in flight.
  When every partition waits on a phase that cannot complete, that is the GPU's hang, and it raises. Different
  ``seed``s explore different interleavings.

What it does not model: warps running apart other than the rules above, which partition's
``fence_async_shared`` made an ``mbarrier.init`` visible (any does here), layouts, the shared-memory layouts of TMA
descriptors and register limits (the compiler's; benchmarks/runtime/sm90_report.py reads those), and timing.
Arithmetic is torch's on the CPU in the kernel's dtypes: integer results are exact as on the GPU; float ones
differ by rounding (no fused multiply-adds here), and fp8 products are summed exactly, where Hopper's fp8 tensor
cores keep about 22 bits, so fp8 results agree to the precision of their fp8 operands, not bit for bit.
"""
from __future__ import annotations

import threading
import types

import torch

from tests.gluon_emulator_partitions import _PartitionState, _Scheduler
from tests.gluon_emulator_state import (Barrier, BarrierArray, DeviceDescriptor, GluonEmulationError,  # noqa: F401
                                        MMAToken, Pointer, SharedMemory, SharedView, _plain, _product, _reg)


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

    def __init__(self, pid, num_warps: int = 4, seed: int = 0):
        self.pid, self.num_warps, self.seed = pid, num_warps, seed
        self.scheduler = None          # a _Scheduler while gl.warp_specialize runs partitions
        self._main = _PartitionState(max(1, num_warps // 4), "the program")
        self._local = threading.local()
        self.partitions = [self._main]
        self.barriers = []
        self.memories = []
        self.n_alloc = 0

    @property
    def state(self) -> _PartitionState:
        return getattr(self._local, "state", self._main)

    def sync_point(self) -> None:
        if self.scheduler is not None:
            self.scheduler.switch()

    def warp_specialize(self, functions_and_args, worker_num_warps, worker_num_regs):
        """The partitions as threads under a _Scheduler; returns what the default partition returns."""
        if self.scheduler is not None:
            raise GluonEmulationError("nested gl.warp_specialize")
        if len(worker_num_warps) != len(functions_and_args) - 1 or len(worker_num_regs) != len(worker_num_warps):
            raise GluonEmulationError("gl.warp_specialize: one warp count and one register count a worker partition")
        warps = [self.num_warps] + [int(w) for w in worker_num_warps]
        results = {}

        def body(i, fn, args):
            def run():
                self._local.state = _PartitionState(max(1, warps[i] // 4), f"partition {i}")
                self.partitions.append(self._local.state)
                results[i] = fn(*args)
                if self._local.state.outstanding:
                    raise GluonEmulationError(f"partition {i} ends with {len(self._local.state.outstanding)} "
                                              "warpgroup_mma in flight")
            return run

        self.scheduler = _Scheduler(self.seed)
        try:
            self.scheduler.run([body(i, fn, tuple(args)) for i, (fn, args) in enumerate(functions_and_args)])
        finally:
            self.scheduler = None
        return results.get(0)

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
            reshape=lambda x, shape, **kw: _reg(_plain(x).reshape(list(shape))),
            permute=lambda x, dims: _reg(_plain(x).permute(tuple(dims))),
            math=_Namespace("math", exp2=lambda x: _reg(torch.exp2(_plain(x)))),
            convert_layout=lambda x, layout, **kw: x, thread_barrier=self.thread_barrier,
            warp_specialize=self.warp_specialize,
            NVMMADistributedLayout=_Layout, DotOperandLayout=_Layout, SliceLayout=_Layout, BlockedLayout=_Layout,
            NVMMASharedLayout=_Layout,
            float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16, float8e4nv=torch.float8_e4m3fn,
            int8=torch.int8, int32=torch.int32, int64=torch.int64)

    def thread_barrier(self):
        """A barrier of the calling partition's warps (the whole program's outside gl.warp_specialize)."""
        for mem in self.memories:
            mem.barrier_passed(self.state)

    # -- mbarrier, tma, wgmma -------------------------------------------------------------------------------------
    def mbarrier(self):
        def init(bar, count):
            if bar.count is not None and not bar.invalid:
                raise GluonEmulationError(f"mbarrier.init of {bar.name}, already initialized")
            bar.count, bar.invalid, bar.fenced, bar.arrivals, bar.tx, bar.phase = count, False, False, 0, 0, 0

        def expect(bar, nbytes, pred=True):
            if bool(pred):
                bar._live("mbarrier.expect")
                bar.tx += int(nbytes)                 # arrive.expect_tx: the bytes to come, and one arrival
                bar.arrive("mbarrier.expect")
                self.sync_point()

        def arrive(bar, *, count=1, pred=True):
            if bool(pred):
                bar._live("mbarrier.arrive")
                self.thread_barrier()          # Gluon puts a barrier of the partition's warps before the arrive
                for _ in range(count):
                    bar.arrive("mbarrier.arrive")
                self.sync_point()

        def wait(bar, phase, pred=True, deps=()):
            if not bool(pred):
                return
            bar._live("mbarrier.wait")
            parity = int(phase) & 1
            if self.scheduler is not None:             # other partitions may still arrive / issue the copies
                self.scheduler.block_until(lambda: (bar.phase & 1) != parity or bar.can_complete(),
                                           f"mbarrier.wait({bar.name}, {parity})")
            if (bar.phase & 1) == parity:
                bar.complete()
            # else the phase of that parity is the completed previous one; either way this partition has now seen
            # every phase completed so far
            self.state.seen[bar] = max(self.state.seen.get(bar, 0), bar.phase)

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
            readers = [p for k in view.mem._overlaps(view.slot, view.mem.released) for p in view.mem.released[k]]
            if readers:
                raise GluonEmulationError(f"TMA copy into {view.where()} after one warp group of {readers[0].name} "
                                          f"waited for the products reading it but before a thread_barrier: its "
                                          f"{readers[0].warp_groups} warp groups may not all be past their waits")
            data = desc.block([int(c) for c in coord])
            if list(data.shape) != list(view.value().shape) or data.dtype != view.mem.data.dtype:
                raise GluonEmulationError(f"TMA block {tuple(data.shape)} {data.dtype} into {view.where()} "
                                          f"{tuple(view.value().shape)} {view.mem.data.dtype}")
            view.mem.writes[view.slot] = bar
            bar.copies.append((view, data, desc.block_type.nbytes))
            self.sync_point()

        return _Namespace("tma", async_copy_global_to_shared=async_copy_global_to_shared)

    def warpgroup_mma(self, a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None,
                      is_async=False):
        a, b = (SharedView(x, None, None) if isinstance(x, SharedMemory) else x for x in (a, b))
        self.sync_point()
        for x in (a, b):
            if isinstance(x, SharedView):
                x.check_readable("warpgroup_mma", self.state)
        if not is_async:           # a synchronous product waits for every group in flight, then for itself
            self.warpgroup_mma_wait(0, deps=[])
            return _product(a, b, acc if bool(use_acc) else None)
        tok = MMAToken(a, b, bool(use_acc), acc)
        for x in (a, b):
            if isinstance(x, SharedView):
                x.mem.reads.setdefault(x.slot, set()).add(tok)
        self.state.outstanding.append(tok)
        return tok

    def warpgroup_mma_wait(self, num_outstanding=0, deps=None):
        if deps is None:
            raise GluonEmulationError("warpgroup_mma_wait deps must be given")
        self.sync_point()
        while len(self.state.outstanding) > num_outstanding:
            tok = self.state.outstanding.pop(0)              # groups complete in the order they were issued
            tok.compute()
            for x in (tok.a, tok.b):
                if isinstance(x, SharedView):
                    x.mem.reads[x.slot].discard(tok)
                    if self.state.warp_groups > 1:
                        x.mem.release(x.slot, self.state)
        # a product still in flight comes back as its token: it may only be chained or waited for again
        results = [d.result if isinstance(d, MMAToken) and d.result is not None else d for d in deps]
        return results[0] if len(results) == 1 else tuple(results)

    def finish(self):
        if any(st.outstanding for st in self.partitions):
            raise GluonEmulationError(f"program {self.pid} exits with warpgroup_mma in flight")
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


def emulate(jit_fn, grid, *args, seed: int = 0, **kwargs) -> None:
    """``jit_fn[grid](*args, **kwargs)`` on the CPU, program by program (see the module docstring); ``seed``: the
    interleaving of warp-specialized partitions."""
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
                program = Program((px, py, pz), num_warps, seed * 1_000_003 + (pz * grid[1] + py) * grid[0] + px)
                _bind(jit_fn, program, {})(*args, **kwargs)
                program.finish()
