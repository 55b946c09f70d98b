"""Attention of the runtime transformers: bf16 (``F.scaled_dot_product_attention``) or quantized (``"int8"``).

The quantized attention follows SageAttention2's recipe for Hopper, which keeps video models about lossless:

- Q in int8 with one scale per token and head (the softmax scale and log2(e) folded into it);
- K smoothed by subtracting its mean over the sequence (per head; the softmax of each query row is invariant to
  adding one constant to all its logits, and q . (k - mean) = q . k - q . mean is such a constant), then int8 with
  one scale per block of ``block_n`` keys;
- Q Kᵀ exact in int32, scales applied to the logits, online softmax in base 2;
- P (in [0, 1] after the running max, scaled by 448) in fp8 e4m3, V in fp8 e4m3 with one scale per channel;
  each block's P V product is added into a separate fp32 accumulator (Hopper's fp8 MMA keeps fewer bits).

:func:`quantized_attention_torch` is that math in torch ops, block by block like the kernel (CPU, tests);
``attention_triton`` holds the Triton kernels. :func:`attention` picks one for a mode and a device;
:func:`cross_attention_mode` keeps the attention to the text in bf16 (why: there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .triton_env import interpreter_active, on_hopper

MODES = ("bf16", "int8")
PV_DTYPES = ("fp8", "fp16")
P_SCALE = 448.0                     # largest finite float8 e4m3: P in [0, 1] is stored as P * 448
LOG2_P_SCALE = math.log2(P_SCALE)
LOG2E = 1.4426950408889634
QK_CODE_MAX = 127.0
SCALE_FLOOR = 1e-12                 # keeps every logit scale a normal float32 (all-zero rows and blocks)
V_SCALE_FLOOR = 1e-30


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"attention must be one of {MODES}, got {mode!r}")
    return mode


def default_mode(device: torch.device | str) -> str:
    """``"int8"`` on a Hopper GPU (sm_90), ``"bf16"`` elsewhere. On Hopper the int8 path passed its GPU tests on an
    H100 and ran the whole-model benchmark on an H100 and an H200: 1.27-1.30x SDPA, cosine >= 0.9992, 0.6 % of a
    1.3B-width W4A4 model's final latent after 20 steps (benchmarks/runtime/RESULTS.md, 2026-12-05). sm_89 and
    Blackwell have fp8 tensor cores too but have never run it: there it is opt-in (``attention="int8"``) until a run
    of benchmarks/runtime/run_gpu.sh is recorded on one. CPU: bf16 (the int8 torch twin is a reference, not a fast
    path)."""
    return "int8" if on_hopper(device) else "bf16"


def cross_attention_mode(mode: str, cross: Optional[str] = None) -> str:
    """The attention of the video queries to the text keys (Wan's ``attn2``) in a model whose self-attention runs
    ``mode``: ``cross`` if given, else bf16 SDPA in either mode. Measured on an H200 (2026-12-05, Wan-14B heads,
    32,760 queries x 512 text keys; benchmarks/runtime/RESULTS.md): SDPA 0.65 ms, our int8 kernel 0.78 ms alone and
    2.49 ms with its Q/K/V quantization (0.26x). With 4 key blocks the kernel is slower than SDPA before any
    quantization pass is counted, so no faster pass makes int8 pay here; at 17k-76k keys (self-attention, CogVideoX's
    joint attention) it was 1.09-1.18x SDPA with its passes."""
    check_mode(mode)
    return "bf16" if cross is None else check_mode(cross)


@dataclass(frozen=True)
class QKPrep:
    """What the runtime does to Q or K between its projection and the attention, fused into the quantization.

    ``norm``: ``"none"``; ``"rms_row"`` (Wan: RMSNorm over all heads of a token, ``weight`` [heads * head_dim]);
    ``"layer_head"`` (CogVideoX: LayerNorm over each head, ``weight``/``bias`` [head_dim]).
    ``cos``/``sin``: interleaved rotary tables [rope_tokens, head_dim] (each frequency twice, as
    ``runtime_parts.apply_interleaved_rope`` takes them), applied to tokens ``rope_start ..`` of the sequence.
    """
    norm: str = "none"
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    eps: float = 1e-6
    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None
    rope_start: int = 0

    def __post_init__(self):
        if self.norm not in ("none", "rms_row", "layer_head"):
            raise ValueError(f"QKPrep.norm must be 'none', 'rms_row' or 'layer_head', got {self.norm!r}")
        if self.norm != "none" and self.weight is None:
            raise ValueError(f"QKPrep.norm={self.norm!r} needs its weight")
        if (self.cos is None) != (self.sin is None):
            raise ValueError("QKPrep needs both rotary tables (cos and sin) or neither")


# ---------------------------------------------------------------------------------------------- torch path
def quantize_qk_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, pv: str = "fp8"):
    """Codes and scales of the quantized attention, [B, H, S, D] layout, float32 values of the codes."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))            # [B, H, S, D]
    sm = qf.shape[-1] ** -0.5 * LOG2E
    a = qf.abs().amax(-1).clamp_min(SCALE_FLOOR)                              # per token and head
    q_codes = torch.round(qf * (QK_CODE_MAX / a)[..., None]).clamp(-QK_CODE_MAX, QK_CODE_MAX)
    q_scale = a / QK_CODE_MAX * sm
    kc = kf - kf.mean(dim=2, keepdim=True)                                     # smoothing: softmax-invariant
    B, H, SK, D = kc.shape
    blocks = -(-SK // block_n)
    padded = F.pad(kc, (0, 0, 0, blocks * block_n - SK)).unflatten(2, (blocks, block_n))
    ak = padded.abs().amax(dim=(-1, -2)).clamp_min(SCALE_FLOOR)               # [B, H, blocks]
    k_codes = torch.round(padded * (QK_CODE_MAX / ak)[..., None, None]).clamp(-QK_CODE_MAX, QK_CODE_MAX)
    k_codes = k_codes.flatten(2, 3)[:, :, :SK]
    k_scale = ak / QK_CODE_MAX
    if pv == "fp8":
        v_scale = (vf.abs().amax(dim=2) / P_SCALE).clamp_min(V_SCALE_FLOOR)    # per channel [B, H, D]
        v_codes = (vf / v_scale[:, :, None, :]).to(torch.float8_e4m3fn).float()
    else:
        v_scale = torch.ones(B, H, D, dtype=torch.float32, device=vf.device)
        v_codes = vf.half().float()
    return q_codes, q_scale, k_codes, k_scale, v_codes, v_scale


def quantized_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int = 64,
                              pv: str = "fp8") -> torch.Tensor:
    """The quantized attention in torch ops, one key block at a time as the kernel walks them.

    q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D] in q's dtype. The int32 logits are exact in float32
    (|q . k| <= 127 * 127 * D < 2**24 for D <= 1024).
    """
    if pv not in PV_DTYPES:
        raise ValueError(f"pv must be one of {PV_DTYPES}, got {pv!r}")
    q_codes, q_scale, k_codes, k_scale, v_codes, v_scale = quantize_qk_torch(q, k, v, block_n, pv)
    B, H, SQ, D = q_codes.shape
    SK = k_codes.shape[2]
    m = torch.full((B, H, SQ), float("-inf"), device=q_codes.device)
    l = torch.zeros(B, H, SQ, device=q_codes.device)
    acc = torch.zeros(B, H, SQ, D, device=q_codes.device)
    for j in range(-(-SK // block_n)):
        cols = slice(j * block_n, min(SK, (j + 1) * block_n))
        s = (q_codes @ k_codes[:, :, cols].transpose(-1, -2)) * (q_scale * k_scale[:, :, j, None])[..., None]
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - (m_new - LOG2_P_SCALE)[..., None])
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1)
        p_q = p.to(torch.float8_e4m3fn).float() if pv == "fp8" else p.half().float()
        acc = acc * alpha[..., None] + p_q @ v_codes[:, :, cols]
        m = m_new
    out = acc / l[..., None] * v_scale[:, :, None, :]
    return out.transpose(1, 2).to(q.dtype)


def attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention in float64 (the oracle of the tests), [B, S, H, D] layout."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax((qd @ kd.transpose(-1, -2)) * qd.shape[-1] ** -0.5, dim=-1)
    return (w @ vd).transpose(1, 2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on the [B, S, H, D] layout (what diffusers runs)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------- dispatch
HEAD_DIMS = (32, 64, 128)           # of the Triton kernel (64 and 128 measured on a GPU)


def triton_usable(q: torch.Tensor) -> bool:
    """Whether the Triton kernel runs this attention: a GPU tensor (or Triton's interpreter), a head dim it has."""
    return (q.is_cuda or interpreter_active()) and q.shape[-1] in HEAD_DIMS


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "bf16") -> torch.Tensor:
    """Non-causal attention, q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D] in q's dtype.

    ``"bf16"``: SDPA. ``"int8"``: the Triton kernel on a GPU (or in Triton's interpreter), else the torch path.
    """
    check_mode(mode)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(f"attention expects q [B, Sq, H, D] and k, v [B, Sk, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if mode == "bf16":
        return sdpa(q, k, v)
    if triton_usable(q):
        from .attention_triton import quantized_attention_triton
        return quantized_attention_triton(q, k, v)
    return quantized_attention_torch(q, k, v)
