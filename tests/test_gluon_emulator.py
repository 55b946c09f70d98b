"""tests/gluon_emulator.py itself, on small Gluon kernels written for one rule each: what Hopper does, and the
errors a kernel that breaks the rule gets (the kernels' own tests rely on these rules)."""
import pytest
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from tests.gluon_emulator import GluonEmulationError, emulate

BLOCK = 64


def _desc(t, block):
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.int8)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


@gluon.jit
def _start_copies(a_desc, b_desc, row):
    """Shared memory for an A and a B tile, and their TMA copies started on one barrier."""
    a_smem = gl.allocate_shared_memory(a_desc.dtype, a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    fence_async_shared()
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [row, 0], bar, a_smem)
    tma.async_copy_global_to_shared(b_desc, [0, 0], bar, b_smem)
    return a_smem, b_smem, bar


@gluon.jit
def _copy_and_product(a_desc, b_desc, out_ptr, row, PARITY: gl.constexpr, WAIT: gl.constexpr):
    """One TMA copy of an A and a B tile, then A @ Bᵀ stored as int32 [64, 64]."""
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32])
    a_smem, b_smem, bar = _start_copies(a_desc, b_desc, row)
    mbarrier.wait(bar, PARITY, pred=WAIT)
    acc = warpgroup_mma(a_smem, b_smem.permute((1, 0)), gl.zeros([64, 64], gl.int32, layout=layout),
                        is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc])
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, layout))
    gl.store(out_ptr + gl.expand_dims(rows, 1) * 64 + gl.expand_dims(cols, 0), acc)
    mbarrier.invalidate(bar)


def _operands(rows=100):
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (rows, 32), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 32), generator=gen, dtype=torch.int8)
    return a, b, _desc(a, [64, 32]), _desc(b, [64, 32])


def test_a_copy_lands_at_the_wait_and_out_of_bounds_rows_read_zero():
    a, b, a_desc, b_desc = _operands(rows=100)
    out = torch.empty(64, 64, dtype=torch.int32)
    emulate(_copy_and_product, (1,), a_desc, b_desc, out, 64, PARITY=0, WAIT=True)
    expected = torch.zeros(64, 64, dtype=torch.int64)
    expected[:36] = a[64:].long() @ b.long().T            # rows 100..127 lie outside A: TMA fills zeros
    assert torch.equal(out.long(), expected)


def test_waiting_for_parity_one_on_a_fresh_barrier_does_not_wait():
    """try_wait.parity(1) on a barrier in phase 0 returns at once: the product then races the copy."""
    _, _, a_desc, b_desc = _operands()
    out = torch.empty(64, 64, dtype=torch.int32)
    with pytest.raises(GluonEmulationError, match="while a TMA copy into it is in flight"):
        emulate(_copy_and_product, (1,), a_desc, b_desc, out, 0, PARITY=1, WAIT=True)
    with pytest.raises(GluonEmulationError, match="while a TMA copy into it is in flight"):
        emulate(_copy_and_product, (1,), a_desc, b_desc, out, 0, PARITY=0, WAIT=False)


@gluon.jit
def _two_products(a_desc, b_desc, out_ptr, WAIT_FOR: gl.constexpr):
    """Two async products; ``warpgroup_mma_wait(WAIT_FOR)`` then the first one's result is used."""
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32])
    a_smem, b_smem, bar = _start_copies(a_desc, b_desc, 0)
    mbarrier.wait(bar, 0)
    zero = gl.zeros([64, 64], gl.int32, layout=layout)
    first = warpgroup_mma(a_smem, b_smem.permute((1, 0)), zero, is_async=True)
    second = warpgroup_mma(a_smem, b_smem.permute((1, 0)), zero, is_async=True)
    first = warpgroup_mma_wait(WAIT_FOR, deps=[first])
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, layout))
    gl.store(out_ptr + gl.expand_dims(rows, 1) * 64 + gl.expand_dims(cols, 0), first + 1)
    second = warpgroup_mma_wait(0, deps=[second])
    mbarrier.invalidate(bar)


def test_products_complete_in_issue_order():
    """wait(1) completes all but the newest group, so the first product is ready; wait(2) completes none."""
    a, b, a_desc, b_desc = _operands(rows=64)
    out = torch.empty(64, 64, dtype=torch.int32)
    emulate(_two_products, (1,), a_desc, b_desc, out, WAIT_FOR=1)
    assert torch.equal(out.long(), a.long() @ b.long().T + 1)
    with pytest.raises(GluonEmulationError, match="used before a warpgroup_mma_wait completed it"):
        emulate(_two_products, (1,), a_desc, b_desc, out, WAIT_FOR=2)


@gluon.jit
def _handshake(flag_ptr, out_ptr, PRODUCER_ARRIVES: gl.constexpr):
    """A worker partition arrives on a barrier the default partition waits for; then the default one writes."""
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    fence_async_shared()
    gl.warp_specialize([(_handshake_waiter, (bar, out_ptr)), (_handshake_arriver, (bar, flag_ptr, PRODUCER_ARRIVES))],
                       [1], [24])
    mbarrier.invalidate(bar)


@gluon.jit
def _handshake_waiter(bar, out_ptr):
    mbarrier.wait(bar, 0)
    gl.store(out_ptr, 1)


@gluon.jit
def _handshake_arriver(bar, flag_ptr, PRODUCER_ARRIVES: gl.constexpr):
    gl.store(flag_ptr, 7)
    mbarrier.arrive(bar, pred=PRODUCER_ARRIVES)


def test_partitions_take_turns_and_a_wait_nobody_can_satisfy_is_a_hang():
    for seed in range(4):
        flag, out = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        emulate(_handshake, (1,), flag, out, PRODUCER_ARRIVES=True, seed=seed)
        assert int(flag) == 7 and int(out) == 1
    with pytest.raises(GluonEmulationError, match="hang: every partition waits"):
        emulate(_handshake, (1,), flag, out, PRODUCER_ARRIVES=False)


@gluon.jit
def _store_row(out_ptr, n, MASKED: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    offs = gl.arange(0, 128, layout=layout)
    if MASKED:
        gl.store(out_ptr + offs, offs, mask=offs < n)
    else:
        gl.store(out_ptr + offs, offs)


def test_accesses_are_checked_against_the_tensor_not_its_storage():
    storage = torch.zeros(256, dtype=torch.int32)
    view = storage[:100]                        # 156 more elements after it in the same storage
    emulate(_store_row, (1,), view, 100, MASKED=True)
    assert torch.equal(view, torch.arange(100, dtype=torch.int32)) and not storage[100:].any()
    with pytest.raises(GluonEmulationError, match="out-of-bounds access through out_ptr"):
        emulate(_store_row, (1,), view, 100, MASKED=False)
