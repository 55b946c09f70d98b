"""Triton kernels of the quantized attention (the math and its torch twin: ``attention``).

Passes before the attention kernel, each one read of its input, one program per block of tokens and head:
- Q: per token and head int8 codes; the runtime's q RMSNorm / LayerNorm and RoPE (``QKPrep``) are applied in the
  same pass, in float32, so the bf16 normalized and rotated Q is never written;
- K: the same pre-processing twice: once for the per-block column sums (-> the mean over the sequence), once for
  the smoothed codes with one scale per block of ``block_n`` keys;
- Wan's RMSNorm spans all heads of a token: its rstd comes from one small pass over Q (and one over K) first, so the
  head programs need not each re-read the other heads (a pass that looped over the heads serially was 17 % of a
  Wan-1.3B forward on an H200, 2026-12-05);
- V: fp8 e4m3 codes with one scale per channel (from a torch amax over the sequence), written transposed
  ([D, S], sequence contiguous): Hopper's fp8 ``wgmma`` takes its B operand K-major only.
Q and K channels are stored even ones first, odd ones second (the rotary pairs are loaded apart): a dot product
does not depend on the order of its terms as long as Q and K share it.

Attention kernel: one program per (block of BLOCK_M queries, batch x head); Q codes stay in registers, K and Vᵀ
tiles come through the tensor-memory accelerator, Q Kᵀ on int8 tensor cores (int32, exact). The int32 logits
become float32 with a magic-number add (one integer and one float add instead of a slow conversion), the scales
and the running max fold into one fused multiply-add a logit, exp2 yields P * 448 directly (optionally half of
it from a cubic on the FMA units: ``AttentionConfig.emulate_exp2``), and P in fp8 times Vᵀ
in fp8 runs on fp8 tensor cores with a fresh accumulator a block, added into the float32 output accumulator.
The key length is a compile-time constant (constant trip count for the pipeliner and for Triton's interpreter,
whose loops cannot take run-time bounds under numpy >= 2.4); the query length is not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .act_quant_triton import cast_rn, round_half_even
from .triton_env import gluon_runs_on, interpreter_requested
from .attention import HEAD_DIMS, LOG2_P_SCALE, LOG2E, P_SCALE, PV_DTYPES, V_SCALE_FLOOR, QKPrep

_NORM_CODES = {"none": 0, "rms_row": 1, "layer_head": 2}
KERNELS = ("triton", "gluon")
_QUANT_ROWS = 64             # tokens a program of the Q pass handles
# The code passes round x * (127 / amax) with the magic-number add; compiled with FMA contraction that becomes
# fma(x, inv, magic), which rounds the exact product instead of the float32 one the torch twin rounds (a code
# off by one at rare ties). Memory-bound passes: no cost to keep the multiply and the add apart.
_NO_FMA = dict(enable_fp_fusion=False)


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    pv: str = "fp8"
    # Triton's automatic warp specialization of the key loop. Compiled for sm_90a (benchmarks/runtime/sm90_report.py)
    # Triton 3.6 specializes 4-warp tiles only, into a TMA producer and two consumer warp groups that each compute
    # the same tile (twice the tensor-core work); 8-warp tiles compile unspecialized. Off; kept for the GPU sweep.
    warp_specialize: bool = False
    # Half of each block's exp2 by a cubic on the FMA units instead of the special-function unit (FlashAttention-4's
    # trick; P is fp8, far coarser than the cubic's 7.5e-5). Off until measured on a GPU.
    emulate_exp2: bool = False
    # "triton" (this file) or "gluon" (attention_gluon.py: the softmax under the next block's Q.K product; Hopper
    # only, 64 or 128 x 128 tiles, one warp group a 64 rows, fp8 P.V; num_stages = its K / V ring depth:
    # AttentionConfig.gluon()). Not yet run on a GPU; run on the CPU by tests/gluon_emulator.py.
    kernel: str = "triton"

    @classmethod
    def gluon(cls, num_stages: int = 2, block_m: Optional[int] = None, emulate_exp2: bool = False,
              warp_specialize: bool = False) -> "AttentionConfig":
        """The Gluon kernel's config: 64 or 128 query rows (one or two warp groups; default 64, 128 when warp
        specialized) against 128-key blocks, and a ring of ``num_stages`` K / V slots. 128 rows halve the K / V
        traffic from L2 (benchmarks/runtime/RESULTS.md). ``warp_specialize``: attention_gluon_ws, each 64-row group
        a partition and a producer warp (``num_warps`` counts the consumers' 8; the launch adds the producer's)."""
        block_m = block_m or (128 if warp_specialize else 64)
        return cls(block_m=block_m, block_n=128, num_warps=block_m // 16, num_stages=num_stages,
                   emulate_exp2=emulate_exp2, warp_specialize=warp_specialize, kernel="gluon")

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"AttentionConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
        gluon_shape = (self.block_m in (64, 128) and (self.block_n, self.num_warps, self.pv)
                       == (128, self.block_m // 16, "fp8"))
        if self.kernel == "gluon" and (not gluon_shape or (self.warp_specialize and self.block_m != 128)
                                       or self.num_stages < 2):
            raise ValueError("AttentionConfig: the Gluon kernel runs 64 x 128 tiles with 4 warps or 128 x 128 with 8, "
                             "fp8 P.V and a ring "
                             f"of num_stages >= 2, warp_specialize at 128 rows only (AttentionConfig.gluon()); "
                             f"got {self}")
        if self.pv not in PV_DTYPES:
            raise ValueError(f"AttentionConfig.pv must be one of {PV_DTYPES}, got {self.pv!r}")
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v > 256 or v & (v - 1):   # a TMA box side is at most 256
                raise ValueError(f"AttentionConfig.{name} must be a power of two in [16, 256], got {v}")
        if self.pv == "fp8" and self.block_n < 32:   # block_n is the K of the P.V product (found on an H200)
            raise ValueError(f"AttentionConfig: fp8 P.V needs block_n >= 32 (fp8 tensor-core products take K >= 32), "
                             f"got {self.block_n}; use pv='fp16' for smaller tiles")


def default_config(head_dim: int) -> AttentionConfig:
    """Tile shape: the fastest of the H200 sweep at both head dims (benchmarks/runtime/RESULTS.md, 2026-12-05:
    28.8 ms vs 31.7 ms for 128 x 128 at Wan-14B, 4.19 vs 4.95 ms at CogVideoX-2B); 64-row tiles let two programs
    share an SM, so one's softmax overlaps the other's tensor-core work."""
    del head_dim  # one shape wins at d = 64 and d = 128 alike
    return AttentionConfig(block_m=64, block_n=128, num_warps=4, num_stages=3)


# ------------------------------------------------------------------------------------------ fp8 cast
@triton.jit
def _to_fp8(x, EXACT: tl.constexpr):
    """float32 -> float8 e4m3 (round to nearest even). The GPU converts in one instruction; Triton 3.6's interpreter
    drops the carry when rounding up crosses a power of two (31.6 -> 16), so there (EXACT) the value is first
    rounded to a representable one: 3 mantissa bits for normals, multiples of 2**-9 below 2**-6, at most 448."""
    if EXACT:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576          # round off 20 mantissa bits, ties even
        normal = bits.to(tl.float32, bitcast=True)
        tiny = round_half_even(x * 512.0) / 512.0
        x = tl.where(tl.abs(x) < 0.015625, tiny, normal)
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(tl.float8e4nv)


# ------------------------------------------------------------------------------------------ Q / K pass
@triton.jit
def _split_pairs(x, D2: tl.constexpr):
    """[ROWS, 2 * D2] -> its even and odd channels [ROWS, D2], split in registers."""
    return tl.split(tl.reshape(x, [x.shape[0], D2, 2]))


@triton.jit
def _load_pairs(xb, rows, row_ok, stride_s, head_off, D2: tl.constexpr):
    """Even and odd channels [ROWS, D/2] of one head, float32 (rows past the end read as zeros). One contiguous load
    of the head's channels, split in registers: two loads of every other bf16 are not vectorized, and the passes
    ran at about a tenth of the memory bandwidth (H100 profile, RESULTS.md)."""
    d = tl.arange(0, 2 * D2)
    x = tl.load(xb + rows[:, None] * stride_s + head_off + d[None, :], mask=row_ok[:, None], other=0.0)
    return _split_pairs(x.to(tl.float32), D2)


@triton.jit
def _token_rows(pid, S, BLK: tl.constexpr):
    """The BLK token rows of block ``pid`` (int64; rows past S clamped to 0) and which of them exist."""
    rows = pid * BLK + tl.arange(0, BLK)
    row_ok = rows < S
    return tl.where(row_ok, rows, 0).to(tl.int64), row_ok


@triton.jit
def _prep(xe, xo, rows, row_ok, h, rstd, nw_ptr, nb_ptr, cos_ptr, sin_ptr, rope_start, eps,
          NORM: tl.constexpr, ROPE: tl.constexpr, D2: tl.constexpr):
    j = tl.arange(0, D2)         # the weights: [D] vectors, read from cache
    d = tl.arange(0, 2 * D2)
    if NORM == 1:        # RMSNorm over the whole token (rstd given), weight [H * D]
        we = tl.load(nw_ptr + h * 2 * D2 + 2 * j).to(tl.float32)
        wo = tl.load(nw_ptr + h * 2 * D2 + 2 * j + 1).to(tl.float32)
        xe = xe * rstd[:, None] * we[None, :]
        xo = xo * rstd[:, None] * wo[None, :]
    if NORM == 2:        # LayerNorm over the head, weight and bias [D]
        mean = (tl.sum(xe, 1) + tl.sum(xo, 1)) / (2 * D2)
        de = xe - mean[:, None]
        do = xo - mean[:, None]
        var = (tl.sum(de * de, 1) + tl.sum(do * do, 1)) / (2 * D2)
        r = 1.0 / tl.sqrt(var + eps)
        we = tl.load(nw_ptr + 2 * j).to(tl.float32)
        wo = tl.load(nw_ptr + 2 * j + 1).to(tl.float32)
        be = tl.load(nb_ptr + 2 * j).to(tl.float32)
        bo = tl.load(nb_ptr + 2 * j + 1).to(tl.float32)
        xe = de * r[:, None] * we[None, :] + be[None, :]
        xo = do * r[:, None] * wo[None, :] + bo[None, :]
    if ROPE:             # pairs (2i, 2i+1): cos of 2i, sin of 2i+1 (runtime_parts.apply_interleaved_rope)
        t = rows - rope_start
        has = (t >= 0) & row_ok
        off = tl.multiple_of(tl.where(has, t, 0).to(tl.int64) * (2 * D2), 2 * D2)[:, None] + d[None, :]
        c, _ = _split_pairs(tl.load(cos_ptr + off, mask=has[:, None], other=1.0), D2)
        _, s = _split_pairs(tl.load(sin_ptr + off, mask=has[:, None], other=0.0), D2)
        xe, xo = xe * c - xo * s, xe * s + xo * c
    return xe, xo


@triton.jit
def _rstd_kernel(x_ptr, rstd_ptr, S, stride_b, stride_s, stride_h, eps,
                 H: tl.constexpr, D2: tl.constexpr, BLK: tl.constexpr):
    """1 / RMS of each token over all its heads (``rms_row``), float32 [B, S]: the one statistic that needs every
    head, computed once so the per-head passes can run in parallel. The tiles, the head order of the sum and the
    launch shape are the ones the quantization pass used when it looped over the heads itself: the same float32
    sums, so the codes did not change by a bit."""
    b = tl.program_id(1)
    rows, row_ok = _token_rows(tl.program_id(0), S, BLK)
    xb = x_ptr + b.to(tl.int64) * stride_b
    ss = tl.zeros([BLK], tl.float32)
    for h in range(H):
        xe, xo = _load_pairs(xb, rows, row_ok, stride_s, h * stride_h, D2)
        ss += tl.sum(xe * xe, 1) + tl.sum(xo * xo, 1)
    rstd = 1.0 / tl.sqrt(ss / (H * 2 * D2) + eps)
    tl.store(rstd_ptr + b.to(tl.int64) * S + rows, rstd, mask=row_ok)


@triton.jit
def _qk_pass_kernel(x_ptr, codes_ptr, scale_ptr, mean_ptr, colsum_ptr, rstd_ptr, nw_ptr, nb_ptr, cos_ptr, sin_ptr,
                    S, stride_b, stride_s, stride_h, rope_start, eps, out_mult,
                    D2: tl.constexpr, BLK: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                    MODE: tl.constexpr):
    """MODE 0: Q codes, one scale a token and head. MODE 1: K codes (mean subtracted), one scale a block of BLK
    tokens. MODE 2: K column sums of the block (-> the mean). One program: BLK tokens of one head of one sample;
    grid (heads, blocks, batch), heads fastest, so the programs that run together read whole token rows."""
    h = tl.program_id(0)
    pid = tl.program_id(1)
    b = tl.program_id(2)
    H = tl.num_programs(0)
    rows, row_ok = _token_rows(pid, S, BLK)
    xb = x_ptr + b.to(tl.int64) * stride_b
    j = tl.arange(0, D2)
    rstd = tl.zeros([BLK], tl.float32)
    if NORM == 1:
        rstd = tl.load(rstd_ptr + b.to(tl.int64) * S + rows, mask=row_ok, other=0.0)
    xe, xo = _load_pairs(xb, rows, row_ok, stride_s, h * stride_h, D2)
    xe, xo = _prep(xe, xo, rows, row_ok, h, rstd, nw_ptr, nb_ptr, cos_ptr, sin_ptr, rope_start, eps, NORM, ROPE, D2)
    bh = b * H + h
    if MODE == 2:
        xe = tl.where(row_ok[:, None], xe, 0.0)
        xo = tl.where(row_ok[:, None], xo, 0.0)
        base = colsum_ptr + ((pid * tl.num_programs(2) + b) * H + h).to(tl.int64) * (2 * D2)
        tl.store(base + j, tl.sum(xe, 0))
        tl.store(base + D2 + j, tl.sum(xo, 0))
    else:
        if MODE == 1:
            xe = tl.where(row_ok[:, None], xe - tl.load(mean_ptr + bh * 2 * D2 + j)[None, :], 0.0)
            xo = tl.where(row_ok[:, None], xo - tl.load(mean_ptr + bh * 2 * D2 + D2 + j)[None, :], 0.0)
            a = tl.maximum(tl.max(tl.max(tl.abs(xe), 1), 0), tl.max(tl.max(tl.abs(xo), 1), 0))
            a = tl.maximum(a, 1e-12)
            tl.store(scale_ptr + bh * tl.num_programs(1) + pid, a / 127.0)
            inv = 127.0 / a
            ce = round_half_even(xe * inv)
            co = round_half_even(xo * inv)
        else:
            a = tl.maximum(tl.maximum(tl.max(tl.abs(xe), 1), tl.max(tl.abs(xo), 1)), 1e-12)
            tl.store(scale_ptr + bh.to(tl.int64) * S + rows, a / 127.0 * out_mult, mask=row_ok)
            inv = 127.0 / a
            ce = round_half_even(xe * inv[:, None])
            co = round_half_even(xo * inv[:, None])
        ce = tl.minimum(tl.maximum(ce, -127.0), 127.0).to(tl.int8)
        co = tl.minimum(tl.maximum(co, -127.0), 127.0).to(tl.int8)
        out = codes_ptr + (bh.to(tl.int64) * S + rows)[:, None] * (2 * D2)
        tl.store(out + j[None, :], ce, mask=row_ok[:, None])
        tl.store(out + D2 + j[None, :], co, mask=row_ok[:, None])


def _prep_args(x: torch.Tensor, prep: Optional[QKPrep]):
    dummy = x.new_empty(1, dtype=torch.float32)
    if prep is None:
        return (dummy, dummy, dummy, dummy, 0, 1e-6), 0, False
    B, S, H, D = x.shape
    nw = prep.weight.contiguous() if prep.weight is not None else dummy
    nb = prep.bias.contiguous() if prep.bias is not None else dummy
    if prep.norm == "rms_row" and nw.numel() != H * D:
        raise ValueError(f"rms_row weight has {nw.numel()} elements, the tokens {H} x {D}")
    if prep.norm == "layer_head" and (nw.numel() != D or nb.numel() != D):
        raise ValueError(f"layer_head weight and bias must have {D} elements")
    rope = prep.cos is not None
    if rope:
        cos = prep.cos.float().reshape(-1, D).contiguous()
        sin = prep.sin.float().reshape(-1, D).contiguous()
        if cos.shape[0] != S - prep.rope_start:
            raise ValueError(f"rotary tables cover {cos.shape[0]} tokens, the sequence from token "
                             f"{prep.rope_start} has {S - prep.rope_start}")
    else:
        cos = sin = dummy
    return (nw, nb, cos, sin, prep.rope_start, prep.eps), _NORM_CODES[prep.norm], rope


def _check_layout(x: torch.Tensor, name: str):
    if x.dim() != 4 or x.stride(-1) != 1 or x.shape[-1] % 16:
        raise ValueError(f"{name} must be [B, S, H, D] with contiguous channels and D a multiple of 16, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")


def _token_rstd(x: torch.Tensor, norm: int, eps: float, blk: int, num_warps: int) -> torch.Tensor:
    """The per-token rstd of the ``rms_row`` norm [B, S] (``_rstd_kernel``), a dummy for the other norms. ``blk`` and
    ``num_warps``: those of the quantization pass that reads it (see the kernel)."""
    if norm != _NORM_CODES["rms_row"]:
        return x.new_empty(1, dtype=torch.float32)
    B, S, H, D = x.shape
    rstd = torch.empty(B, S, dtype=torch.float32, device=x.device)
    _rstd_kernel[(triton.cdiv(S, blk), B)](x, rstd, S, x.stride(0), x.stride(1), x.stride(2), eps, H=H, D2=D // 2,
                                           BLK=blk, num_warps=num_warps, **_NO_FMA)
    return rstd


def quantize_q(q: torch.Tensor, prep: Optional[QKPrep] = None):
    """Q [B, S, H, D] -> int8 codes [B, H, S, D] (channels even-first) and float32 scales [B, H, S] that include
    the softmax scale and log2(e)."""
    _check_layout(q, "q")
    B, S, H, D = q.shape
    codes = torch.empty(B, H, S, D, dtype=torch.int8, device=q.device)
    scale = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    (nw, nb, cos, sin, start, eps), norm, rope = _prep_args(q, prep)
    rstd = _token_rstd(q, norm, eps, _QUANT_ROWS, 4)
    _qk_pass_kernel[(H, triton.cdiv(S, _QUANT_ROWS), B)](
        q, codes, scale, scale, scale, rstd, nw, nb, cos, sin, S, q.stride(0), q.stride(1), q.stride(2), start, eps,
        D ** -0.5 * LOG2E, D2=D // 2, BLK=_QUANT_ROWS, NORM=norm, ROPE=rope, MODE=0, num_warps=4, **_NO_FMA)
    return codes, scale


def quantize_k(k: torch.Tensor, block_n: int, prep: Optional[QKPrep] = None):
    """K [B, S, H, D] -> smoothed int8 codes [B, H, S, D] (channels even-first), scales [B, H, ceil(S / block_n)]
    and the subtracted mean [B, H, D]."""
    _check_layout(k, "k")
    B, S, H, D = k.shape
    blocks = triton.cdiv(S, block_n)
    (nw, nb, cos, sin, start, eps), norm, rope = _prep_args(k, prep)
    warps = 4 if block_n <= 64 else 8
    rstd = _token_rstd(k, norm, eps, block_n, warps)       # once for both passes
    colsum = torch.empty(blocks, B, H, D, dtype=torch.float32, device=k.device)
    args = (rstd, nw, nb, cos, sin, S, k.stride(0), k.stride(1), k.stride(2), start, eps, 1.0)
    meta = dict(D2=D // 2, BLK=block_n, NORM=norm, ROPE=rope, num_warps=warps, **_NO_FMA)
    grid = (H, blocks, B)
    _qk_pass_kernel[grid](k, colsum, colsum, colsum, colsum, *args, MODE=2, **meta)
    mean = (colsum.sum(0) / S).contiguous()
    codes = torch.empty(B, H, S, D, dtype=torch.int8, device=k.device)
    scale = torch.empty(B, H, blocks, dtype=torch.float32, device=k.device)
    _qk_pass_kernel[grid](k, codes, scale, mean, colsum, *args, MODE=1, **meta)
    return codes, scale, mean


# ------------------------------------------------------------------------------------------ V pass
@triton.jit
def _v_pass_kernel(v_ptr, vt_ptr, inv_ptr, S, S_PAD, stride_b, stride_s, stride_h,
                   H: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr, FP8: tl.constexpr,
                   EXACT_FP8: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLK + tl.arange(0, BLK)
    d = tl.arange(0, D)
    x = tl.load(v_ptr + b.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_s + h * stride_h + d[None, :],
                mask=(rows < S)[:, None], other=0.0).to(tl.float32)
    if FP8:
        x = x * tl.load(inv_ptr + bh * D + d)[None, :]
    xt = tl.trans(x)                                   # [D, BLK]: stored sequence-contiguous
    if FP8:
        y = _to_fp8(xt, EXACT_FP8)
    else:
        y = xt.to(tl.float16)
    out = vt_ptr + (bh.to(tl.int64) * D + d)[:, None] * S_PAD + rows[None, :]
    tl.store(out, y, mask=(rows < S_PAD)[None, :])


def quantize_v(v: torch.Tensor, pv: str = "fp8"):
    """V [B, S, H, D] -> transposed codes [B, H, D, S padded to 16] (fp8 e4m3 with per-channel scales [B, H, D],
    or fp16 with unit scales)."""
    _check_layout(v, "v")
    B, S, H, D = v.shape
    s_pad = triton.cdiv(S, 16) * 16
    if pv == "fp8":
        amax = torch.linalg.vector_norm(v, float("inf"), dim=1).float()                  # [B, H, D], one read
        scale = (amax / P_SCALE).clamp_min(V_SCALE_FLOOR).contiguous()
        inv = 1.0 / scale
        dtype = torch.float8_e4m3fn
    else:
        scale = inv = torch.ones(B, H, D, dtype=torch.float32, device=v.device)
        dtype = torch.float16
    vt = torch.empty(B, H, D, s_pad, dtype=dtype, device=v.device)
    blk = 64
    _v_pass_kernel[(triton.cdiv(s_pad, blk), B * H)](v, vt, inv, S, s_pad, v.stride(0), v.stride(1), v.stride(2),
                                                     H=H, D=D, BLK=blk, FP8=pv == "fp8",
                                                     EXACT_FP8=interpreter_requested(), num_warps=4)
    return vt, scale


# ------------------------------------------------------------------------------------------ attention kernel
@triton.jit
def _exp2_poly(x):
    """2**x on the FMA units: x = j + f (j integer, |f| <= 1/2), 2**f by a cubic (relative error 7.5e-5, far below
    fp8 P's 2**-4 step), 2**j added to the exponent bits. x >= -125 (smaller -> 2**-125: 0 once P is fp8)."""
    x = tl.maximum(x, -125.0)
    t = x + 12582912.0                                         # 1.5 * 2**23: rounds x to an integer in the bits
    f = x - (t - 12582912.0)
    p = 0.99992807 + f * (0.693261 + f * (0.24261117 + f * 0.05517162))
    e = (t.to(tl.int32, bitcast=True) - 0x4B400000) << 23
    return (p.to(tl.int32, bitcast=True) + e).to(tl.float32, bitcast=True)


@triton.jit
def _exp2_logits(x, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """exp2 of a block of logits; EMULATE: every other column on the FMA units (FlashAttention-4's trick), so the
    special-function unit, whose exp2 rate equals the tensor cores' logit rate at d = 128, does half the work.
    The column pairs split along a register bit of the MMA layout."""
    if EMULATE:          # one return: Gluon, which calls this too, wants the same type from every return
        a, b = tl.split(x.reshape([BLOCK_M, BLOCK_N // 2, 2]))
        y = tl.join(tl.math.exp2(a), _exp2_poly(b)).reshape([BLOCK_M, BLOCK_N])
    else:
        y = tl.math.exp2(x)
    return y


@triton.jit
def _attend_block(qk, vt, c, m_i, l_i, acc, col0, SK: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr, PV_FP8: tl.constexpr, LOG2_P: tl.constexpr, EXACT_FP8: tl.constexpr,
                  EMULATE_EXP2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Online softmax of one block of int32 logits ``qk`` (exact Q Kᵀ codes) and its P.V into ``acc``."""
    if MASK:             # the last, partial block: keys past SK (the next head's, or zeros) get -inf
        cols = col0 + tl.arange(0, BLOCK_N)
        s = tl.where(cols[None, :] < SK, qk.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        p = tl.math.exp2(s * c[:, None] - (m_new - LOG2_P)[:, None])
    else:                # float(qk) = bits(qk + magic) - 1.5 * 2**23, folded into the per-row constant
        m_new = tl.maximum(m_i, tl.max(qk, 1).to(tl.float32) * c)
        f = (qk + 0x4B400000).to(tl.float32, bitcast=True)
        p = _exp2_logits(f * c[:, None] - (m_new - LOG2_P + 12582912.0 * c)[:, None], EMULATE_EXP2, BLOCK_M, BLOCK_N)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        pv = tl.dot(_to_fp8(p, EXACT_FP8), vt.T, out_dtype=tl.float32)
    else:
        pv = tl.dot(p.to(tl.float16), vt.T, out_dtype=tl.float32)
    acc = acc * alpha[:, None] + pv               # each block's product into the float32 accumulator
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["SQ"])
def _attention_kernel(q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, SQ,
                      stride_ob, stride_os, stride_oh,
                      H: tl.constexpr, SK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, LOG2_P: tl.constexpr,
                      EXACT_FP8: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EMULATE_EXP2: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < SQ
    q = q_desc.load([bh * SQ + pid_m * BLOCK_M, 0])          # rows past SQ: another head's or zeros, not stored
    qs = tl.load(q_scale_ptr + bh.to(tl.int64) * SQ + offs_m, mask=m_ok, other=1.0)
    NBLK: tl.constexpr = (SK + BLOCK_N - 1) // BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for j in tl.range(0, SK // BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([bh * SK + j * BLOCK_N, 0])
        vt = v_desc.load([bh * D, j * BLOCK_N])
        c = qs * tl.load(k_scale_ptr + bh * NBLK + j)
        qk = tl.dot(q, k.T, out_dtype=tl.int32)                   # exact
        m_i, l_i, acc = _attend_block(qk, vt, c, m_i, l_i, acc, j * BLOCK_N, SK, BLOCK_N, False, PV_FP8,
                                      LOG2_P, EXACT_FP8, EMULATE_EXP2, BLOCK_M)
    if SK % BLOCK_N != 0:
        j_last: tl.constexpr = SK // BLOCK_N
        k = k_desc.load([bh * SK + j_last * BLOCK_N, 0])
        vt = v_desc.load([bh * D, j_last * BLOCK_N])
        c = qs * tl.load(k_scale_ptr + bh * NBLK + j_last)
        qk = tl.dot(q, k.T, out_dtype=tl.int32)
        m_i, l_i, acc = _attend_block(qk, vt, c, m_i, l_i, acc, j_last * BLOCK_N, SK, BLOCK_N, True, PV_FP8,
                                      LOG2_P, EXACT_FP8, EMULATE_EXP2, BLOCK_M)
    d = tl.arange(0, D)
    vs = tl.load(v_scale_ptr + bh * D + d)
    out = acc * vs[None, :] / l_i[:, None]
    b = bh // H
    h = bh % H
    o = o_ptr + b.to(tl.int64) * stride_ob + offs_m.to(tl.int64)[:, None] * stride_os + h * stride_oh + d[None, :]
    tl.store(o, cast_rn(out, o_ptr.dtype.element_ty, EXACT_FP8), mask=m_ok[:, None])


@dataclass
class QuantizedQKV:
    """The attention kernel's operands: codes and scales of Q, K (smoothed) and Vᵀ, and the block size of K's."""
    q_codes: torch.Tensor
    q_scale: torch.Tensor
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    vt: torch.Tensor
    v_scale: torch.Tensor
    block_n: int


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_prep: Optional[QKPrep] = None,
                 k_prep: Optional[QKPrep] = None, config: Optional[AttentionConfig] = None) -> QuantizedQKV:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_layout(t, name)
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    if k.shape != (B, SK, H, D) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not match")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported by the quantized attention kernel {HEAD_DIMS}")
    cfg = config or default_config(D)
    q_codes, q_scale = quantize_q(q, q_prep)
    k_codes, k_scale, _ = quantize_k(k, cfg.block_n, k_prep)
    vt, v_scale = quantize_v(v, cfg.pv)
    return QuantizedQKV(q_codes, q_scale, k_codes, k_scale, vt, v_scale, cfg.block_n)


def attention_from_codes(qkv: QuantizedQKV, out: torch.Tensor,
                         config: Optional[AttentionConfig] = None) -> torch.Tensor:
    """The attention kernel alone on quantized operands; ``out`` [B, Sq, H, D] (channels contiguous)."""
    B, H, SQ, D = qkv.q_codes.shape
    SK = qkv.k_codes.shape[2]
    cfg = config or default_config(D)
    if cfg.block_n != qkv.block_n or (cfg.pv == "fp8") != (qkv.vt.dtype == torch.float8_e4m3fn):
        raise ValueError(f"K was quantized in blocks of {qkv.block_n} and V as {qkv.vt.dtype}; the config says "
                         f"block_n={cfg.block_n}, pv={cfg.pv}")
    if out.shape != (B, SQ, H, D) or out.stride(-1) != 1:
        raise ValueError(f"out must be [B, Sq, H, D] = {[B, SQ, H, D]} with contiguous channels")
    if SQ == 0:
        return out
    if cfg.kernel == "gluon":
        if not gluon_runs_on(qkv.q_codes):
            raise ValueError("AttentionConfig(kernel='gluon') runs on a Hopper GPU (sm_90) only: it is written for "
                             "Hopper's wgmma and has no interpreter; use kernel='triton' here")
        from .attention_gluon import attention_from_codes_gluon
        return attention_from_codes_gluon(qkv, out, cfg.num_stages, LOG2_P_SCALE, cfg.block_m, cfg.emulate_exp2,
                                          cfg.warp_specialize)
    s_pad = qkv.vt.shape[-1]
    q_desc = TensorDescriptor(qkv.q_codes, [B * H * SQ, D], [D, 1], [cfg.block_m, D])
    k_desc = TensorDescriptor(qkv.k_codes, [B * H * SK, D], [D, 1], [cfg.block_n, D])
    v_desc = TensorDescriptor(qkv.vt, [B * H * D, s_pad], [s_pad, 1], [D, cfg.block_n])
    grid = (triton.cdiv(SQ, cfg.block_m), B * H)
    _attention_kernel[grid](q_desc, k_desc, v_desc, qkv.q_scale, qkv.k_scale, qkv.v_scale, out, SQ,
                            out.stride(0), out.stride(1), out.stride(2), H=H, SK=SK, D=D, BLOCK_M=cfg.block_m,
                            BLOCK_N=cfg.block_n, PV_FP8=cfg.pv == "fp8", LOG2_P=LOG2_P_SCALE,
                            EXACT_FP8=interpreter_requested(), WARP_SPECIALIZE=cfg.warp_specialize,
                            EMULATE_EXP2=cfg.emulate_exp2,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def quantized_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_prep: Optional[QKPrep] = None,
                               k_prep: Optional[QKPrep] = None, config: Optional[AttentionConfig] = None,
                               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Non-causal quantized attention: q [B, Sq, H, D], k/v [B, Sk, H, D] (channels contiguous, any other strides,
    e.g. views of the projections' [B, S, H * D] outputs) -> [B, Sq, H, D] (``out``, or new, in q's dtype).

    ``q_prep``/``k_prep``: the norm and rotary embedding to apply first (fused into the quantization passes).
    """
    qkv = quantize_qkv(q, k, v, q_prep, k_prep, config)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return attention_from_codes(qkv, out, config)
