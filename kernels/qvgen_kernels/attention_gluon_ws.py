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
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma_wait)

from .attention_gluon import _issue_pv, _issue_qk, _load_kv, _softmax

HALF_M = 64           # query rows a consumer warp group
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
def _consumer(q_desc, q_smem, q_bar, k_smem, v_smem, k_bars, v_bars, empty_bars, q_scale_ptr, k_scale_ptr,
              v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh, bh, row0, H: gl.constexpr, SK: gl.constexpr,
              D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOG2_P: gl.constexpr,
              EMULATE_EXP2: gl.constexpr):
    """64 query rows from ``row0``: attention_gluon's key loop, releasing each ring slot to the producer."""
    BLOCK_M: gl.constexpr = 64
    NBLK: gl.constexpr = (SK + BLOCK_N - 1) // BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)      # rows past SQ: another head's or zeros, not stored
    tma.async_copy_global_to_shared(q_desc, [bh * SQ + row0, 0], q_bar, q_smem)
    offs_m = row0 + gl.arange(0, BLOCK_M, layout=row_s)
    qs = gl.load(q_scale_ptr + bh.to(gl.int64) * SQ + offs_m, mask=offs_m < SQ, other=1.0)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    o_zero = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)

    mbarrier.wait(q_bar, 0)
    qk = warpgroup_mma_wait(0, deps=[_issue_qk(q_smem, k_smem, k_bars, 0, s_zero, STAGES)])
    for j in range(0, NBLK - 1):
        s_tok = _issue_qk(q_smem, k_smem, k_bars, j + 1, s_zero, STAGES)            # S_{j+1} runs ...
        p8, alpha, m_i, l_i = _softmax(qk, qs, k_scale_ptr, bh, j, m_i, l_i, SK, NBLK, BLOCK_M, BLOCK_N, LOG2_P,
                                       False, EMULATE_EXP2, s_layout, p_layout)       # ... under block j's softmax
        pv_tok = _issue_pv(p8, v_smem, v_bars, j, o_zero, STAGES)
        qk = warpgroup_mma_wait(1, deps=[s_tok])                                     # S_{j+1} done
        pv = warpgroup_mma_wait(0, deps=[pv_tok])                                    # PV_j done ...
        mbarrier.arrive(empty_bars.index(j % STAGES))                                # ... slot j is free here
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1) + pv
    p8, alpha, m_i, l_i = _softmax(qk, qs, k_scale_ptr, bh, NBLK - 1, m_i, l_i, SK, NBLK, BLOCK_M, BLOCK_N, LOG2_P,
                                   SK % BLOCK_N != 0, EMULATE_EXP2, s_layout, p_layout)
    pv = warpgroup_mma_wait(0, deps=[_issue_pv(p8, v_smem, v_bars, NBLK - 1, o_zero, STAGES)])
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1) + pv

    out_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 * 8 // D, D // 8],
                                                warps_per_cta=[4, 1], order=[1, 0])
    vs = gl.load(v_scale_ptr + bh * D + gl.arange(0, D, layout=gl.SliceLayout(0, o_layout)))
    out = acc * gl.expand_dims(vs, 0) / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    out = gl.convert_layout(out.to(o_ptr.dtype.element_ty), out_layout)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, out_layout))
    o = (o_ptr + (bh // H).to(gl.int64) * stride_ob + gl.expand_dims(rows.to(gl.int64) * stride_os, 1)
         + (bh % H) * stride_oh + gl.expand_dims(cols, 0))
    gl.store(o, out, mask=gl.expand_dims(rows < SQ, 1))


@gluon.jit(do_not_specialize=["SQ"])
def _attention_kernel_gluon_ws(q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, SQ,
                               stride_ob, stride_os, stride_oh,
                               H: gl.constexpr, SK: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOG2_P: gl.constexpr,
                               EMULATE_EXP2: gl.constexpr):
    gl.static_assert(BLOCK_M == 128, "two consumer warp groups of 64 rows")
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
        (_consumer, (q_desc, q_smem.index(0), q_bars.index(0), k_smem, v_smem, k_bars, v_bars, empty_bars,
                     q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh, bh,
                     pid_m * BLOCK_M, H, SK, D, BLOCK_N, STAGES, LOG2_P, EMULATE_EXP2)),
        (_consumer, (q_desc, q_smem.index(1), q_bars.index(1), k_smem, v_smem, k_bars, v_bars, empty_bars,
                     q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh, bh,
                     pid_m * BLOCK_M + 64, H, SK, D, BLOCK_N, STAGES, LOG2_P, EMULATE_EXP2)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, empty_bars, bh, SK, D, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    for i in gl.static_range(2):
        mbarrier.invalidate(q_bars.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
        mbarrier.invalidate(empty_bars.index(i))
