"""The Gluon attention kernel with FlashAttention-3's division of labour: a producer warp and two consumer warp groups.

``attention_gluon`` runs 128 query rows as two warp groups in one instruction stream: before each K / V refill all
eight warps meet at a CTA barrier, so the groups move in lockstep, their softmaxes at the same time, their products
at the same time. Here each 64-row half is a partition of its own (``gl.warp_specialize``), and one more warp only
issues the TMA loads: a ring slot is refilled once both consumer groups have arrived on its "empty" mbarrier
(after waiting for their own products that read it), so no consumer ever waits for the other, and one group's
softmax can run while the other's products occupy the tensor cores (FlashAttention-3's ping-pong, here left to the
warp schedulers rather than forced with named barriers). Per consumer, the key loop is attention_gluon's: block
j+1's Q.Kᵀ under block j's softmax, the same helpers, the same math.

``AttentionConfig.gluon(num_stages, block_m=128, ..., warp_specialize=True)``; Hopper only. Gluon has no
interpreter; tests/gluon_emulator.py runs the three partitions as threads under a scheduler of its own. Not yet run
on a GPU (2026-12-05).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from .attention_gluon import _attend_rows, _load_kv

CONSUMER_REGS = gl.constexpr(240)   # registers a consumer thread (setmaxnreg); the producer warp keeps PRODUCER_REGS
PRODUCER_REGS = gl.constexpr(24)


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, empty_bars, bh, SK: gl.constexpr, D: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Every key block into the ring, a slot once both consumers released its previous block."""
    NBLK: gl.constexpr = (SK + BLOCK_N - 1) // BLOCK_N
    for blk in range(NBLK):
        mbarrier.wait(empty_bars.index(blk % STAGES), (blk // STAGES + 1) & 1, pred=blk >= STAGES)
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, bh, blk, SK, D, BLOCK_N, STAGES, True)


@gluon.jit
def _consumer(q_desc, q_smem, q_bar, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, empty_bars, q_scale_ptr,
              k_scale_ptr, v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh, bh, row0, H: gl.constexpr,
              SK: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOG2_P: gl.constexpr,
              EMULATE_EXP2: gl.constexpr):
    """64 query rows from ``row0``: their own Q tile, then attention_gluon's key loop, releasing each slot."""
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)      # rows past SQ: another head's or zeros, not stored
    tma.async_copy_global_to_shared(q_desc, [bh * SQ + row0, 0], q_bar, q_smem)
    _attend_rows(q_smem, q_bar, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, empty_bars, q_scale_ptr, k_scale_ptr,
                 v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh, bh, row0, H, SK, D, 64, BLOCK_N, STAGES,
                 LOG2_P, EMULATE_EXP2, False)


@gluon.jit(do_not_specialize=["SQ"])
def _attention_kernel_gluon_ws(q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, SQ,
                               stride_ob, stride_os, stride_oh,
                               H: gl.constexpr, SK: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOG2_P: gl.constexpr,
                               EMULATE_EXP2: gl.constexpr):
    gl.static_assert(BLOCK_M == 128, "two consumer warp groups of 64 rows")
    gl.static_assert(STAGES >= 2, "a ring of at least two K / V slots")
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2)          # one arrival from each consumer
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (q_desc, q_smem.index(0), q_bars.index(0), k_desc, v_desc, k_smem, v_smem, k_bars, v_bars,
                     empty_bars, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh,
                     bh, pid_m * BLOCK_M, H, SK, D, BLOCK_N, STAGES, LOG2_P, EMULATE_EXP2)),
        (_consumer, (q_desc, q_smem.index(1), q_bars.index(1), k_desc, v_desc, k_smem, v_smem, k_bars, v_bars,
                     empty_bars, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh,
                     bh, pid_m * BLOCK_M + 64, H, SK, D, BLOCK_N, STAGES, LOG2_P, EMULATE_EXP2)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, empty_bars, bh, SK, D, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    for i in gl.static_range(2):
        mbarrier.invalidate(q_bars.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
        mbarrier.invalidate(empty_bars.index(i))
