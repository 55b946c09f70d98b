"""The quantized attention kernel in Triton's Gluon dialect, for Hopper: the softmax under the tensor cores.

Same operands and math as ``attention_triton._attention_kernel`` (int8 Q.Kᵀ, the magic-number int -> float, exp2
yielding P * 448, fp8 P.V with a fresh float32 accumulator a block, ``acc = acc * alpha + PV``). What Gluon adds is
the schedule that Triton 3.6's passes do not produce (benchmarks/runtime/RESULTS.md, "What Triton builds for
Hopper"): block j+1's Q.Kᵀ is issued asynchronously before block j's softmax and waited for after it
(``warpgroup_mma_wait(1)``), so the exponentials run while the int8 product does (FlashAttention-3's
intra-warpgroup overlap). Compiled for sm_90a on the CPU at d = 128 with a ring of 2, all 66 exp2 of a thread's
key block are issued with that product outstanding (ring of 3: 59; d = 64, a shorter product: 26), against none
in the Triton kernel (``tests/test_kernels_sm90.py``).

One program: 64 or 128 queries of one (batch, head), one warp group a 64 rows; its warps also issue the TMA loads
of K and Vᵀ into a ring of ``num_stages`` shared-memory slots, one mbarrier a slot and operand; a slot is refilled
once the products that read it have been waited for. The last key block, when partial, gives its keys past SK
-inf. 128 rows read each K / V tile once for two warp groups: half the L2 traffic of 64-row programs.
``emulate_exp2``: half of each block's exponentials by the Triton kernel's own cubic on the FMA units.

Runs on Hopper only: ``AttentionConfig.gluon()``; the GPU tests compare it with the Triton kernel. Gluon has no
interpreter; tests/gluon_emulator.py runs this source on the CPU with its TMA copies, mbarrier phases and async
products modelled (tests/test_attention_gluon_emulated.py: the Triton kernel's output, no race, no hang). Not yet
run on a GPU (2026-12-05): speed, and anything the emulator does not model, are the next device session's.
"""
from __future__ import annotations

from functools import lru_cache

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .attention_triton import _exp2_logits

BLOCK_MS = (64, 128)  # query rows a program: one warp group (m64 wgmma atoms) a 64 rows
BLOCK_N = 128


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, bh, blk, SK: gl.constexpr, D: gl.constexpr,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, pred):
    """TMA loads of key block ``blk`` (its K tile and Vᵀ tile) into ring slot blk % STAGES, if ``pred``."""
    s = blk % STAGES
    mbarrier.expect(k_bars.index(s), k_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [bh * SK + blk * BLOCK_N, 0], k_bars.index(s), k_smem.index(s), pred=pred)
    mbarrier.expect(v_bars.index(s), v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(v_desc, [bh * D, blk * BLOCK_N], v_bars.index(s), v_smem.index(s), pred=pred)


@gluon.jit
def _issue_qk(q_smem, k_smem, k_bars, blk, s_zero, STAGES: gl.constexpr):
    """Wait for K tile ``blk`` (its slot's use number ``blk // STAGES`` gives the phase) and issue S = Q Kᵀ."""
    s = blk % STAGES
    mbarrier.wait(k_bars.index(s), (blk // STAGES) & 1)
    return warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)


@gluon.jit
def _issue_pv(p8, v_smem, v_bars, blk, o_zero, STAGES: gl.constexpr):
    """Wait for Vᵀ tile ``blk`` and issue PV = P V (A from registers; the slot is [D, BLOCK_N], sequence
    contiguous, so its transpose is the K-major B operand fp8 wgmma needs)."""
    s = blk % STAGES
    mbarrier.wait(v_bars.index(s), (blk // STAGES) & 1)
    return warpgroup_mma(p8, v_smem.index(s).permute((1, 0)), o_zero, use_acc=False, is_async=True)


@gluon.jit
def _softmax(qk, qs, k_scale_ptr, bh, blk, m_i, l_i, SK: gl.constexpr, NBLK: gl.constexpr, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, LOG2_P: gl.constexpr, MASK: gl.constexpr, EMULATE_EXP2: gl.constexpr,
             s_layout: gl.constexpr, p_layout: gl.constexpr):
    """Online softmax of one block of int32 logits, as ``attention_triton._attend_block``: fp8 P in the layout the
    P.V product reads, alpha, the new running max and row sum."""
    c = qs * gl.load(k_scale_ptr + bh * NBLK + blk)
    if MASK:             # the last, partial block: keys past SK (the next head's, or zeros) get -inf
        cols = blk * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < SK, 0), qk.to(gl.float32), float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * c)
        p = gl.exp2(s * gl.expand_dims(c, 1) - gl.expand_dims(m_new - LOG2_P, 1))     # -inf: exactly 0
    else:                # float(qk) = bits(qk + magic) - 1.5 * 2**23, folded into the per-row constant
        m_new = gl.maximum(m_i, gl.max(qk, 1).to(gl.float32) * c)
        f = (qk + 0x4B400000).to(gl.float32, bitcast=True)
        p = _exp2_logits(f * gl.expand_dims(c, 1) - gl.expand_dims(m_new - LOG2_P + 12582912.0 * c, 1),
                         EMULATE_EXP2, BLOCK_M, BLOCK_N)
    p = gl.convert_layout(p, s_layout)       # emulate_exp2's split / join give an equal layout of another type
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return gl.convert_layout(p.to(gl.float8e4nv), p_layout), alpha, m_new, l_i


@gluon.jit
def _attend_rows(q_smem, q_bar, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, empty_bars, q_scale_ptr, k_scale_ptr,
                 v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh, bh, row0, H: gl.constexpr,
                 SK: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, LOG2_P: gl.constexpr, EMULATE_EXP2: gl.constexpr, REFILL: gl.constexpr):
    """BLOCK_M query rows from ``row0`` (their Q tile arriving on ``q_bar``) through every key block of the ring, then
    their output. ``REFILL``: these warps refill each slot once done with it, all of them past their waits first;
    else they arrive on the slot's ``empty_bars`` barrier for a producer warp (attention_gluon_ws)."""
    NBLK: gl.constexpr = (SK + BLOCK_N - 1) // BLOCK_N
    WARPS: gl.constexpr = BLOCK_M // 16
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, D, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

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
        pv = warpgroup_mma_wait(0, deps=[pv_tok])                                    # PV_j done: slot j is free
        if REFILL:
            gl.thread_barrier()      # every warp past its wait before the TMA overwrites the slot its products read
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, bh, j + STAGES, SK, D, BLOCK_N, STAGES,
                     j + STAGES < NBLK)
        else:
            mbarrier.arrive(empty_bars.index(j % STAGES))     # Gluon puts a barrier of these warps before it
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1) + pv
    p8, alpha, m_i, l_i = _softmax(qk, qs, k_scale_ptr, bh, NBLK - 1, m_i, l_i, SK, NBLK, BLOCK_M, BLOCK_N, LOG2_P,
                                   SK % BLOCK_N != 0, EMULATE_EXP2, s_layout, p_layout)
    pv = warpgroup_mma_wait(0, deps=[_issue_pv(p8, v_smem, v_bars, NBLK - 1, o_zero, STAGES)])
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1) + pv

    out_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 * 8 // D, D // 8],
                                                warps_per_cta=[WARPS, 1], order=[1, 0])
    vs = gl.load(v_scale_ptr + bh * D + gl.arange(0, D, layout=gl.SliceLayout(0, o_layout)))
    out = acc * gl.expand_dims(vs, 0) / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    out = gl.convert_layout(out.to(o_ptr.dtype.element_ty), out_layout)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, out_layout))
    o = (o_ptr + (bh // H).to(gl.int64) * stride_ob + gl.expand_dims(rows.to(gl.int64) * stride_os, 1)
         + (bh % H) * stride_oh + gl.expand_dims(cols, 0))
    gl.store(o, out, mask=gl.expand_dims(rows < SQ, 1))


@gluon.jit(do_not_specialize=["SQ"])
def _attention_kernel_gluon(q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, SQ,
                            stride_ob, stride_os, stride_oh,
                            H: gl.constexpr, SK: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOG2_P: gl.constexpr,
                            EMULATE_EXP2: gl.constexpr):
    gl.static_assert(BLOCK_M == 64 or BLOCK_M == 128, "one or two warp groups: 64- or 128-row tiles")
    gl.static_assert(STAGES >= 2, "a ring of at least two K / V slots")
    NBLK: gl.constexpr = (SK + BLOCK_N - 1) // BLOCK_N
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(s), count=1)
        mbarrier.init(v_bars.index(s), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)      # rows past SQ: another head's or zeros, not stored
    tma.async_copy_global_to_shared(q_desc, [bh * SQ + pid_m * BLOCK_M, 0], q_bar, q_smem)
    for b in gl.static_range(STAGES):
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, bh, b, SK, D, BLOCK_N, STAGES, b < NBLK)
    _attend_rows(q_smem, q_bar, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, k_bars, q_scale_ptr, k_scale_ptr,
                 v_scale_ptr, o_ptr, SQ, stride_ob, stride_os, stride_oh, bh, pid_m * BLOCK_M, H, SK, D, BLOCK_M,
                 BLOCK_N, STAGES, LOG2_P, EMULATE_EXP2, True)

    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(s))
        mbarrier.invalidate(v_bars.index(s))


@lru_cache(maxsize=None)
def descriptor_layouts(head_dim: int, block_m: int = 64):
    """Shared-memory layouts of the Q, K and Vᵀ tiles (the TMA descriptors carry them)."""
    return (gl.NVMMASharedLayout.get_default_for([block_m, head_dim], gl.int8),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, head_dim], gl.int8),
            gl.NVMMASharedLayout.get_default_for([head_dim, BLOCK_N], gl.float8e4nv))


def launch(qkv, out, num_stages: int, log2_p: float, block_m: int = 64, emulate_exp2: bool = False,
           warp_specialize: bool = False):
    """The kernel, its grid and its arguments on quantized operands (``attention_triton.QuantizedQKV``, K in blocks
    of 128, fp8 Vᵀ): what ``attention_from_codes_gluon`` launches and tests/gluon_emulator.py runs on the CPU."""
    import triton
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, SQ, D = qkv.q_codes.shape
    SK = qkv.k_codes.shape[2]
    s_pad = qkv.vt.shape[-1]
    if block_m not in BLOCK_MS or (warp_specialize and block_m != 128):
        raise ValueError(f"the Gluon attention kernel runs {BLOCK_MS} query rows a program (128 when warp "
                         f"specialized), got {block_m}")
    q_rows = 64 if warp_specialize else block_m          # each consumer warp group loads its own 64 rows
    q_layout, k_layout, v_layout = descriptor_layouts(D, q_rows)
    q_desc = TensorDescriptor(qkv.q_codes, [B * H * SQ, D], [D, 1], [q_rows, D], q_layout)
    k_desc = TensorDescriptor(qkv.k_codes, [B * H * SK, D], [D, 1], [BLOCK_N, D], k_layout)
    v_desc = TensorDescriptor(qkv.vt, [B * H * D, s_pad], [s_pad, 1], [D, BLOCK_N], v_layout)
    args = (q_desc, k_desc, v_desc, qkv.q_scale, qkv.k_scale, qkv.v_scale, out, SQ, out.stride(0), out.stride(1),
            out.stride(2))
    constants = dict(H=H, SK=SK, D=D, BLOCK_M=block_m, BLOCK_N=BLOCK_N, STAGES=num_stages, LOG2_P=log2_p,
                     EMULATE_EXP2=emulate_exp2, num_warps=4 if warp_specialize else block_m // 16)
    if warp_specialize:
        from .attention_gluon_ws import _attention_kernel_gluon_ws as kernel
    else:
        kernel = _attention_kernel_gluon
    return kernel, (triton.cdiv(SQ, block_m), B * H), args, constants


def attention_from_codes_gluon(qkv, out, num_stages: int, log2_p: float, block_m: int = 64,
                               emulate_exp2: bool = False, warp_specialize: bool = False):
    """Launch on quantized operands (see ``launch``; ``warp_specialize``: attention_gluon_ws's kernel)."""
    kernel, grid, args, constants = launch(qkv, out, num_stages, log2_p, block_m, emulate_exp2, warp_specialize)
    kernel[grid](*args, **constants)
    return out
