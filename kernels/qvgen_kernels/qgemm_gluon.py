"""The W4A4 GEMM's K loop in Triton's Gluon dialect, for Hopper: one int8 product group kept in flight.

Triton 3.6 drains the tensor cores at every K step of an integer-accumulator GEMM: after each step's ``IGMMA`` comes
``WARPGROUP.DEPBAR.LE gsb0, 0x0`` (benchmarks/runtime/RESULTS.md, "What Triton builds for Hopper", item 5). Here
the waits are written by hand: step k's product is issued asynchronously, then ``warpgroup_mma_wait(1)`` waits
for step k-1's alone, whose ring slot is then refilled with the tiles ``STAGES - 1`` steps ahead, so the tensor
cores always have the next product queued. Tiles, grouped tile order, operands and the epilogue are
``qgemm_triton``'s own (its ``_tile_coords`` and ``_epilogue`` are Triton functions, callable from Gluon): the
two kernels differ in the K loop alone, and their outputs are bit-identical (tests/test_kernels_gemm_gluon.py).

``GemmConfig(variant="gluon")``; int8 codes, Hopper only. Gluon has no interpreter: tests/gluon_emulator.py runs
this source on the CPU. Not yet run on a GPU (2026-12-05).
"""
from __future__ import annotations

from functools import lru_cache

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .qgemm_triton import _epilogue, _tile_coords


@gluon.jit
def _load_step(a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n, kt, BLOCK_K: gl.constexpr,
               STAGES: gl.constexpr, pred):
    """TMA loads of K step ``kt``'s activation and weight tiles into ring slot kt % STAGES, if ``pred``."""
    s = kt % STAGES
    mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [off_m, kt * BLOCK_K], ready.index(s), a_smem.index(s), pred=pred)
    tma.async_copy_global_to_shared(b_desc, [off_n, kt * BLOCK_K], ready.index(s), b_smem.index(s), pred=pred)


@gluon.jit(do_not_specialize=["M"])
def _gemm_gluon_kernel(a_desc, b_desc, c_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_scale_ptr, w_zero_ptr,
                       w_colsum_ptr, bias_ptr, res_ptr, gate_ptr, stride_rm, rows_per_sample, M, N, stride_cm,
                       K: gl.constexpr, HAS_BIAS: gl.constexpr, EPILOGUE: gl.constexpr, HAS_GATE: gl.constexpr,
                       LIBDEVICE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                       GROUP_M: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr):
    KT: gl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    INSTR_N: gl.constexpr = BLOCK_N if BLOCK_N <= 128 else 128      # int8 wgmma: n <= 128 here, as Triton picks
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    pid_m, pid_n = _tile_coords(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()
    for kt in gl.static_range(STAGES - 1):       # out-of-bounds rows and K columns read as zero
        _load_step(a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n, kt, BLOCK_K, STAGES, kt < KT)

    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=acc_layout)
    for kt in range(KT):
        s = kt % STAGES
        mbarrier.wait(ready.index(s), (kt // STAGES) & 1)
        acc = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])     # step kt - 1's product done: slot (kt - 1) % STAGES is free
        gl.thread_barrier()                          # every warp group past that wait before the slot is refilled
        _load_step(a_desc, b_desc, a_smem, b_smem, ready, off_m, off_n, kt + STAGES - 1, BLOCK_K, STAGES,
                   kt + STAGES - 1 < KT)
    acc = warpgroup_mma_wait(0, deps=[acc])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    if BLOCK_N > INSTR_N:        # the epilogue a half of the columns at a time: half its registers live at once
        lo, hi = gl.split(gl.permute(gl.reshape(acc, [BLOCK_M, 2, BLOCK_N // 2]), (0, 2, 1)))
        lo = gl.convert_layout(lo, acc_layout)      # a [BLOCK_M, 128] half in the MMA layout: no data moves
        hi = gl.convert_layout(hi, acc_layout)
        cols = gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(0, acc_layout))
        _epilogue(lo, rows, off_n + cols, M, N, c_ptr, stride_cm, a_scale_ptr, a_zero_ptr, a_rowsum_ptr,
                  w_scale_ptr, w_zero_ptr, w_colsum_ptr, bias_ptr, res_ptr, gate_ptr, stride_rm, rows_per_sample, K,
                  HAS_BIAS, EPILOGUE, HAS_GATE, LIBDEVICE)
        _epilogue(hi, rows, off_n + BLOCK_N // 2 + cols, M, N, c_ptr, stride_cm, a_scale_ptr, a_zero_ptr,
                  a_rowsum_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr, bias_ptr, res_ptr, gate_ptr, stride_rm,
                  rows_per_sample, K, HAS_BIAS, EPILOGUE, HAS_GATE, LIBDEVICE)
    else:
        _epilogue(acc, rows, off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout)), M, N, c_ptr,
                  stride_cm, a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr, bias_ptr,
                  res_ptr, gate_ptr, stride_rm, rows_per_sample, K, HAS_BIAS, EPILOGUE, HAS_GATE, LIBDEVICE)


@lru_cache(maxsize=None)
def tile_layouts(block_m: int, block_n: int, block_k: int):
    """Shared-memory layouts of the activation and weight tiles (the TMA descriptors carry them)."""
    return (gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8),
            gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.int8))


def launch(a, b, out, epilogue_args, meta: dict, config):
    """The kernel, its grid and its arguments for codes ``a`` [M, K] and ``b`` [N, K] (int8, 16-byte aligned rows):
    what ``qgemm_triton.quant_matmul_triton`` launches for ``variant="gluon"`` and tests/gluon_emulator.py runs on
    the CPU. ``epilogue_args`` and ``meta``: the Triton kernels' own."""
    import triton
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, K = a.shape
    N = b.shape[0]
    a_layout, b_layout = tile_layouts(config.block_m, config.block_n, config.block_k)
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [config.block_m, config.block_k], a_layout)
    b_desc = TensorDescriptor(b, [N, K], [b.stride(0), 1], [config.block_n, config.block_k], b_layout)
    constants = {k: v for k, v in meta.items() if k not in ("FP8", "FP8_PROMOTE_EVERY", "num_stages")}
    constants.update(STAGES=config.num_stages, WARPS=config.num_warps)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    return _gemm_gluon_kernel, grid, (a_desc, b_desc, out, *epilogue_args, M, N, out.stride(0)), constants
