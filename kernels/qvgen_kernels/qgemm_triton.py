"""Triton kernel (b): W4A4 / W3A3 GEMM on 8-bit tensor cores, zero-point corrections and bias in the epilogue.

Codes 0..15 are exact in int8 and in fp8 e4m3, so the product of two code matrices runs on Hopper's 8-bit
``wgmma``; int8 accumulates in int32 (exact), fp8 in float32. The epilogue turns the integer sums into
``s_a * s_w * (I1 - z_w * I2) + bias`` (see ``qgemm``) and writes bf16, optionally after what the model does next
(``qgemm.Epilogue``: GELU, or a gated residual update), so that no separate element-wise pass reads it back. Kernels
are built without contracted multiply-adds (``enable_fp_fusion=False``): the epilogue's few float operations round
as torch's separate kernels do, and the fused residual update equals the unfused one bit for bit.

Variants (``GemmConfig.variant``), measured against each other in benchmarks/kernels:
- ``"ptr"``: tiles loaded through pointers; the weight operand is either the unpacked int8/fp8 codes
  [N, K] or, with ``packed_b``, the packed bytes [N, K/2] unpacked in the kernel.
- ``"tma"``: tiles loaded by the tensor-memory accelerator (host tensor descriptors), one tile a program.
- ``"tma_persistent"``: the same with one program per SM walking over output tiles.
- ``"gluon"``: the "tma" kernel with its K loop written in Gluon (``qgemm_gluon``), one product group kept in
  flight; int8 codes, Hopper only.
The reduction length K is a compile-time constant (constant trip count for the pipeliner; also, loops
with run-time bounds do not run in Triton 3.6's interpreter under numpy >= 2.4); the token count M is not
specialized on, so a new sequence length compiles nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.tools.tensor_descriptor import TensorDescriptor

from .act_quant import QuantizedActivations
from .act_quant_triton import cast_rn
from .qgemm import EPILOGUES, Epilogue, PackedWeight
from .triton_env import gluon_runs_on, interpreter_requested

VARIANTS = ("ptr", "tma", "tma_persistent", "gluon")


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    variant: str = "ptr"
    packed_b: bool = False   # ptr variant only: read the packed weight bytes and unpack them in the kernel

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"GemmConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.packed_b and self.variant != "ptr":
            raise ValueError("packed_b is implemented for the 'ptr' variant only")
        if self.variant == "gluon" and (self.num_warps not in (4, 8) or self.block_m % (16 * self.num_warps)
                                        or max(self.block_m, self.block_n, self.block_k) > 256 or self.block_k < 32
                                        or self.num_stages < 2):
            raise ValueError("GemmConfig: the Gluon kernel runs one warp group a 64 rows of block_m (num_warps 4 or "
                             "8, block_m a multiple of 16 * num_warps), tiles of at most 256 (a TMA box side), "
                             f"block_k >= 32 and a ring of num_stages >= 2; got {self}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 16, got {v}")


@lru_cache(maxsize=None)
def default_config(M: int, N: int, K: int, variant: Optional[str] = None) -> GemmConfig:
    """Tile shape and variant by problem size (H100 sweep, benchmarks/kernels/RESULTS.md): 128 x 256 x 128
    tiles, 4 stages, one persistent program per SM; 256 x 128 when N is small (1536 / 1920). ``variant``: these
    tiles through another kernel (``RuntimeTransformer.set_gemm``). Cached: linears ask at every call."""
    if M <= 64:
        cfg = GemmConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4, variant="tma")
    elif N <= 2048:
        cfg = GemmConfig(block_m=256, block_n=128, block_k=128, num_warps=8, num_stages=4, variant="tma")
    else:
        cfg = GemmConfig(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=4, variant="tma_persistent")
    return cfg if variant is None else replace(cfg, variant=variant)


# ------------------------------------------------------------------------------------------ epilogue
@triton.jit
def _tanh(u, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(u)
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)     # the interpreter has no libdevice; |tanh| rounds to 1 there
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, a_scale_ptr, a_zero_ptr, a_rowsum_ptr,
              w_scale_ptr, w_zero_ptr, w_colsum_ptr, bias_ptr, res_ptr, gate_ptr, stride_rm, rows_per_sample,
              K: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_GATE: tl.constexpr,
              LIBDEVICE: tl.constexpr):
    EXACT_CAST: tl.constexpr = not LIBDEVICE           # the interpreter
    mask_m = offs_m < M
    mask_n = offs_n < N
    za = tl.load(a_zero_ptr + offs_m, mask=mask_m, other=0.0).to(tl.int32)
    sa = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    rowsum = tl.load(a_rowsum_ptr + offs_m, mask=mask_m, other=0)
    sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    zw = tl.load(w_zero_ptr + offs_n, mask=mask_n, other=0.0)
    colsum = tl.load(w_colsum_ptr + offs_n, mask=mask_n, other=0)
    # I1 = sum qa*qw - z_a * colsum(qw), I2 = rowsum(qa) - K * z_a: exact integers
    i1 = acc.to(tl.int32) - za[:, None] * colsum[None, :]
    i2 = rowsum - K * za
    y = (sa[:, None] * sw[None, :]) * (i1.to(tl.float32) - zw[None, :] * i2.to(tl.float32)[:, None])
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE != 0:    # qgemm.apply_epilogue_torch on the output rounded to its dtype (kernel built without FMA)
        y = cast_rn(y, c_ptr.dtype.element_ty, EXACT_CAST).to(tl.float32)
    if EPILOGUE == 1:    # GELU, tanh approximation, in ATen's order of operations
        inner = 0.7978845608028654 * (y + 0.044715 * (y * y * y))
        y = 0.5 * y * (1.0 + _tanh(inner, LIBDEVICE))
    if EPILOGUE == 2:    # residual + y * gate of the row's sample, in float32
        rows = offs_m.to(tl.int64)
        r = tl.load(res_ptr + rows[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            sample = (rows // rows_per_sample)[:, None]
            y = r + y * tl.load(gate_ptr + sample * N + offs_n[None, :], mask=mask, other=0.0)
        else:
            y = r + y
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, cast_rn(y, c_ptr.dtype.element_ty, EXACT_CAST), mask=mask)


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-tiles share each column of weight tiles while it is in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_size
    pid_n = (tile % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, FP8: tl.constexpr, FP8_PROMOTE_EVERY: tl.constexpr):
    if FP8 and FP8_PROMOTE_EVERY > 0:
        return tl.dot(a, b, acc, max_num_imprecise_acc=FP8_PROMOTE_EVERY, out_dtype=tl.float32)
    return tl.dot(a, b, acc, out_dtype=tl.float32 if FP8 else tl.int32)


# ------------------------------------------------------------------------------------------ ptr variant
@triton.jit(do_not_specialize=["M"])
def _gemm_ptr_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_scale_ptr, w_zero_ptr,
                     w_colsum_ptr, bias_ptr, res_ptr, gate_ptr, stride_rm, rows_per_sample, M, N, stride_am, stride_bn,
                     stride_cm, K: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                     HAS_GATE: tl.constexpr, LIBDEVICE: tl.constexpr, PACKED_B: tl.constexpr, FP8: tl.constexpr,
                     FP8_PROMOTE_EVERY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)     # wrapped: out-of-range rows/columns read valid memory, never stored
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    if PACKED_B:
        offs_kp = tl.arange(0, BLOCK_K // 2)
        b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_kp[:, None]      # [BLOCK_K / 2, BLOCK_N] bytes
    else:
        b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]       # [BLOCK_K, BLOCK_N] codes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
    for kt in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        if K % BLOCK_K == 0:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        if PACKED_B:
            p = tl.load(b_ptrs, mask=2 * offs_kp[:, None] < k_left, other=0)
            # byte j holds codes 2j (low nibble) and 2j+1 (high nibble)
            pair = tl.join((p & 0x0F).to(tl.int8), (p >> 4).to(tl.int8))           # [BK/2, BN, 2]
            b = tl.reshape(tl.permute(pair, (0, 2, 1)), (BLOCK_K, BLOCK_N))
            b_ptrs += BLOCK_K // 2
        else:
            if K % BLOCK_K == 0:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            b_ptrs += BLOCK_K
        acc = _dot(a, b, acc, FP8, FP8_PROMOTE_EVERY)
        a_ptrs += BLOCK_K
    _epilogue(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, a_scale_ptr, a_zero_ptr, a_rowsum_ptr,
              w_scale_ptr, w_zero_ptr, w_colsum_ptr, bias_ptr, res_ptr, gate_ptr, stride_rm, rows_per_sample, K,
              HAS_BIAS, EPILOGUE, HAS_GATE, LIBDEVICE)


# ------------------------------------------------------------------------------------------ TMA variants
@triton.jit(do_not_specialize=["M"])
def _gemm_tma_kernel(a_desc, b_desc, c_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_scale_ptr, w_zero_ptr,
                     w_colsum_ptr, bias_ptr, res_ptr, gate_ptr, stride_rm, rows_per_sample, M, N, stride_cm,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_GATE: tl.constexpr,
                     LIBDEVICE: tl.constexpr, FP8: tl.constexpr, FP8_PROMOTE_EVERY: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
    for kt in range(tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, kt * BLOCK_K])      # out-of-bounds elements read as zero
        b = b_desc.load([off_n, kt * BLOCK_K])
        acc = _dot(a, b.T, acc, FP8, FP8_PROMOTE_EVERY)
    _epilogue(acc, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N), M, N, c_ptr, stride_cm,
              a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr, bias_ptr, res_ptr,
              gate_ptr, stride_rm, rows_per_sample, K, HAS_BIAS, EPILOGUE, HAS_GATE, LIBDEVICE)


@triton.jit(do_not_specialize=["M"])
def _gemm_tma_persistent_kernel(a_desc, b_desc, c_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_scale_ptr,
                                w_zero_ptr, w_colsum_ptr, bias_ptr, res_ptr, gate_ptr, stride_rm, rows_per_sample,
                                M, N, stride_cm, num_programs, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                EPILOGUE: tl.constexpr, HAS_GATE: tl.constexpr, LIBDEVICE: tl.constexpr,
                                FP8: tl.constexpr,
                                FP8_PROMOTE_EVERY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0)
    while tile < num_tiles:
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
        for kt in range(tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, kt * BLOCK_K])
            b = b_desc.load([off_n, kt * BLOCK_K])
            acc = _dot(a, b.T, acc, FP8, FP8_PROMOTE_EVERY)
        _epilogue(acc, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N), M, N, c_ptr, stride_cm,
                  a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr, bias_ptr, res_ptr,
                  gate_ptr, stride_rm, rows_per_sample, K, HAS_BIAS, EPILOGUE, HAS_GATE, LIBDEVICE)
        tile += num_programs


# ------------------------------------------------------------------------------------------ weight unpack
@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, N, stride_p, stride_o, K: tl.constexpr, TO_FP8: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.program_id(1) * BLOCK_KP + tl.arange(0, BLOCK_KP)
    p = tl.load(packed_ptr + offs_n.to(tl.int64)[:, None] * stride_p + offs_j[None, :],
                mask=(offs_n[:, None] < N) & (offs_j[None, :] < (K + 1) // 2), other=0)
    pair = tl.join(p & 0x0F, p >> 4)                                   # [BLOCK_N, BLOCK_KP, 2]
    q = tl.reshape(pair, (BLOCK_N, 2 * BLOCK_KP))
    offs_k = tl.program_id(1) * 2 * BLOCK_KP + tl.arange(0, 2 * BLOCK_KP)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * stride_o + offs_k[None, :]
    if TO_FP8:
        tl.store(ptrs, q.to(tl.float32).to(tl.float8e4nv), mask=mask)
    else:
        tl.store(ptrs, q.to(tl.int8), mask=mask)


def unpack_weight(weight: PackedWeight, dtype: torch.dtype = torch.int8,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Codes [N, K] in int8 or float8 e4m3, written into ``out`` (a reusable workspace) when given."""
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"unpack dtype must be int8 or float8_e4m3fn, got {dtype}")
    N, K = weight.out_features, weight.in_features
    if out is None:
        out = torch.empty((N, K), dtype=dtype, device=weight.packed.device)
    elif out.shape != (N, K) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"workspace must be {dtype} [{N}, {K}] with contiguous rows")
    block_n, block_kp = 32, 64
    grid = (triton.cdiv(N, block_n), triton.cdiv((K + 1) // 2, block_kp))
    _unpack_kernel[grid](weight.packed, out, N, weight.packed.stride(0), out.stride(0), K=K,
                         TO_FP8=dtype == torch.float8_e4m3fn, BLOCK_N=block_n, BLOCK_KP=block_kp, num_warps=4)
    return out


# ------------------------------------------------------------------------------------------ launcher
_NUM_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device.index not in _NUM_SMS:
        _NUM_SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS[device.index]


@dataclass
class GemmCall:
    """One GEMM's launch, checked and allocated: codes ``a`` [M, K] and ``b``, the output, the epilogue's tensor
    arguments and the kernels' compile-time arguments."""
    a: torch.Tensor
    b: torch.Tensor
    out: torch.Tensor
    epilogue_args: tuple
    meta: dict
    config: GemmConfig

    @property
    def fp8(self) -> bool:
        return self.a.dtype == torch.float8_e4m3fn


def prepare_gemm(act: QuantizedActivations, weight: PackedWeight, weight_codes: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                 config: Optional[GemmConfig] = None, fp8_promote_every: int = 0,
                 epilogue: Optional[Epilogue] = None) -> GemmCall:
    """What :func:`quant_matmul_triton` launches (its arguments, checked), without launching it."""
    a = act.codes
    M, K = a.shape
    N = weight.out_features
    if K != weight.in_features:
        raise ValueError(f"activation has {K} features, weight expects {weight.in_features}")
    config = config or default_config(M, N, K)
    fp8 = a.dtype == torch.float8_e4m3fn
    if config.packed_b:
        if fp8:
            raise ValueError("packed_b unpacks to int8; it needs int8 activation codes")
        b = weight.packed
    else:
        if weight_codes is None or weight_codes.shape != (N, K) or weight_codes.dtype != a.dtype:
            raise ValueError(f"weight_codes must be {a.dtype} [{N}, {K}] (see unpack_weight)")
        b = weight_codes
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError("codes must have contiguous rows")
    if epilogue is not None:
        epilogue.check(M, N)
        if epilogue.residual is not None:
            if epilogue.residual.stride(-1) != 1:
                raise ValueError("the residual must have contiguous rows")
            out_dtype = epilogue.residual.dtype
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    has_bias = bias is not None
    bias_arg = bias if has_bias else weight.scale     # never read when HAS_BIAS is False
    res = epilogue.residual if epilogue is not None and epilogue.residual is not None else out
    gate = epilogue.gate.contiguous() if epilogue is not None and epilogue.gate is not None else weight.scale
    epi = (act.scale, act.zero, act.rowsum, weight.scale, weight.zero, weight.colsum, bias_arg, res, gate,
           res.stride(0), epilogue.rows_per_sample if epilogue is not None else 1)
    kind = 0 if epilogue is None else 1 + EPILOGUES.index(epilogue.kind)
    meta = dict(K=K, HAS_BIAS=has_bias, EPILOGUE=kind, HAS_GATE=epilogue is not None and epilogue.gate is not None,
                LIBDEVICE=not interpreter_requested(), enable_fp_fusion=False, FP8=fp8,
                FP8_PROMOTE_EVERY=fp8_promote_every,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                num_warps=config.num_warps, num_stages=config.num_stages)
    return GemmCall(a, b, out, epi, meta, config)


def quant_matmul_triton(act: QuantizedActivations, weight: PackedWeight, weight_codes: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                        config: Optional[GemmConfig] = None, fp8_promote_every: int = 0,
                        epilogue: Optional[Epilogue] = None) -> torch.Tensor:
    """``x_hat @ w_hat.T + bias`` from activation codes and weight codes.

    ``weight_codes``: the unpacked codes [N, K] in the activation codes' dtype (int8 or float8 e4m3), e.g.
    from :func:`unpack_weight`; None with ``config.packed_b`` reads ``weight.packed`` directly.
    ``fp8_promote_every``: for fp8 codes, how many K products the tensor cores may accumulate before the sum
    is promoted to full float32 (0 = Triton's default, never on Hopper).
    """
    call = prepare_gemm(act, weight, weight_codes, bias, out_dtype, config, fp8_promote_every, epilogue)
    a, b, out, epi, meta, config, fp8 = (call.a, call.b, call.out, call.epilogue_args, call.meta, call.config,
                                         call.fp8)
    (M, K), N = a.shape, out.shape[1]
    if M == 0:
        return out
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    tma_ok = all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (a, b))
    if config.variant == "ptr" or not tma_ok:     # the tensor-memory accelerator needs 16-byte aligned rows (the
        # TMA variants, Gluon's too, fall back to pointer loads without them)
        _gemm_ptr_kernel[(tiles,)](a, b, out, *epi, M, N, a.stride(0), b.stride(0), out.stride(0),
                                   PACKED_B=config.packed_b, **meta)
        return out
    if config.variant == "gluon":
        if fp8 or not gluon_runs_on(a):
            raise ValueError("GemmConfig(variant='gluon') runs int8 codes on a Hopper GPU (sm_90) only: it is written "
                             "for Hopper's wgmma and has no interpreter; use variant='tma' here")
        from .qgemm_gluon import launch
        kernel, grid, args, constants = launch(a, b, out, epi, meta, config)
        kernel[grid](*args, **constants)
        return out
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [config.block_m, config.block_k])
    b_desc = TensorDescriptor(b, [N, K], [b.stride(0), 1], [config.block_n, config.block_k])
    if config.variant == "tma":
        _gemm_tma_kernel[(tiles,)](a_desc, b_desc, out, *epi, M, N, out.stride(0), **meta)
    else:
        programs = min(tiles, _num_sms(a.device))
        _gemm_tma_persistent_kernel[(programs,)](a_desc, b_desc, out, *epi, M, N, out.stride(0), programs, **meta)
    return out
