"""Runtime Wan 2.1 text-to-video transformer: diffusers' WanTransformer3DModel math with quantized linears.

Loads an export folder (``format``); every linear listed in its quantization config is a
:class:`QuantizedLinear`, the others plain bf16 ``nn.Linear``. Module names are diffusers' names, so an
export's tensor names are the diffusers state-dict keys. Each forward maps the sampler timesteps to their
timestep groups (``codes.timestep_group``, as in training) and sets them for all quantized linears.

It serves as the ``transformer`` of diffusers' ``WanPipeline``: same forward signature, ``config``
(attribute access), ``dtype``, ``device`` and ``cache_context``. Built without a quantization config it is
the plain bf16 model (used to check the assembly against diffusers). Text-to-video only: the image
conditioning of the I2V models and Wan 2.2's per-token timesteps are refused.
"""
from __future__ import annotations

import collections
import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import codes
from .attention import QKPrep, attention, triton_usable
from .context import timestep_groups
from .format import QuantizationConfig
from .linear import QuantizedLinear
from .norm_quant import NormSpec, norm_quantize
from .qgemm import Epilogue
from .runtime_parts import (RuntimeConfig, RuntimeTransformer, apply_interleaved_rope, fp32_layer_norm,
                            run_linear, runtime_config, runtime_linear, timestep_sinusoids)
from .triton_env import on_hopper

_DEFAULTS = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                 rope_max_seq_len=1024, pos_embed_seq_len=None)


WanRuntimeOutput = collections.namedtuple("WanRuntimeOutput", ["sample"])   # .sample and [0], like diffusers'


def wan_config(config: Mapping) -> RuntimeConfig:
    cfg = runtime_config(_DEFAULTS, config)
    cfg["patch_size"] = tuple(cfg["patch_size"])
    cfg["out_channels"] = cfg["out_channels"] or cfg["in_channels"]
    if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None or cfg.pos_embed_seq_len is not None:
        raise ValueError("the runtime Wan transformer is text-to-video only (image_dim / added_kv_proj_dim set)")
    if cfg.qk_norm != "rms_norm_across_heads":
        raise ValueError(f"qk_norm {cfg.qk_norm!r} is not supported (Wan 2.1 uses 'rms_norm_across_heads')")
    if cfg.attention_head_dim % 2 or len(cfg.patch_size) != 3:
        raise ValueError("attention_head_dim must be even and patch_size 3-dimensional")
    return cfg


class _Attention(nn.Module):
    """``attn1`` (self-attention, RoPE) or ``attn2`` (``cross_attention``: queries to the text embeddings, whose
    mode ``RuntimeTransformer.set_attention`` picks apart: bf16 SDPA under ``"int8"`` too)."""

    def __init__(self, prefix: str, dim: int, heads: int, eps: float, quant, dtype, cross_attention: bool = False):
        super().__init__()
        self.heads = heads
        self.cross_attention = cross_attention
        self.to_q = runtime_linear(f"{prefix}.to_q", dim, dim, quant, dtype)
        self.to_k = runtime_linear(f"{prefix}.to_k", dim, dim, quant, dtype)
        self.to_v = runtime_linear(f"{prefix}.to_v", dim, dim, quant, dtype)
        self.to_out = nn.ModuleList([runtime_linear(f"{prefix}.to_out.0", dim, dim, quant, dtype)])
        self.norm_q = nn.RMSNorm(dim, eps=eps, dtype=dtype)
        self.norm_k = nn.RMSNorm(dim, eps=eps, dtype=dtype)
        self.attention_mode = "bf16"
        self.attention_config = None         # the quantized kernel's AttentionConfig (None: default per head dim)

    def attend(self, x, context=None, rope=None):
        """Projections, q/k norm, RoPE and attention: [B, S, heads * head_dim] in the model dtype."""
        context = x if context is None else context
        return self.attend_projected(run_linear(self.to_q, x), run_linear(self.to_k, context),
                                     run_linear(self.to_v, context), rope)

    def attend_projected(self, q, k, v, rope=None):
        """q/k norm, RoPE and attention of projected [B, S, heads * head_dim] q, k, v."""
        dtype = self.norm_q.weight.dtype
        q, k, v = (t.to(dtype).unflatten(2, (self.heads, -1)) for t in (q, k, v))
        if self.attention_mode == "int8" and triton_usable(q):
            from .attention_triton import quantized_attention_triton     # norm and RoPE fused into quantization
            cos, sin = rope if rope is not None else (None, None)
            prep = [QKPrep("rms_row", norm.weight, eps=norm.eps, cos=cos, sin=sin)
                    for norm in (self.norm_q, self.norm_k)]
            return quantized_attention_triton(q, k, v, *prep, config=self.attention_config).flatten(2, 3)
        # q/k RMSNorm over all heads (diffusers: torch.nn.RMSNorm in the activation dtype)
        q = self.norm_q(q.flatten(2, 3)).unflatten(2, (self.heads, -1))
        k = self.norm_k(k.flatten(2, 3)).unflatten(2, (self.heads, -1))
        if rope is not None:
            q, k = apply_interleaved_rope(q, *rope), apply_interleaved_rope(k, *rope)
        return attention(q, k, v, self.attention_mode).flatten(2, 3).type_as(q)

    def forward(self, x, context=None, rope=None):
        return run_linear(self.to_out[0], self.attend(x, context, rope))


class _FeedForward(nn.Module):
    """diffusers FeedForward(gelu-approximate): ``net.0.proj`` -> GELU(tanh) -> ``net.2``."""

    def __init__(self, prefix: str, dim: int, inner: int, quant, dtype):
        super().__init__()
        first = nn.Module()
        first.proj = runtime_linear(f"{prefix}.net.0.proj", dim, inner, quant, dtype)
        self.net = nn.ModuleList([first, nn.Identity(), runtime_linear(f"{prefix}.net.2", inner, dim, quant, dtype)])

    def forward(self, x):
        return run_linear(self.net[2], F.gelu(run_linear(self.net[0].proj, x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, prefix: str, cfg: RuntimeConfig, quant, dtype):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.eps = cfg.eps
        self.attn1 = _Attention(f"{prefix}.attn1", dim, cfg.num_attention_heads, cfg.eps, quant, dtype)
        self.attn2 = _Attention(f"{prefix}.attn2", dim, cfg.num_attention_heads, cfg.eps, quant, dtype,
                                cross_attention=True)
        self.norm2 = nn.LayerNorm(dim, cfg.eps, dtype=dtype) if cfg.cross_attn_norm else None
        self.ffn = _FeedForward(f"{prefix}.ffn", dim, cfg.ffn_dim, quant, dtype)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, dim, dtype=dtype))
        # forward_fused where it applies: None = on Hopper (the fused kernels' GPU tests pass on the H100 and the
        # benchmark's int8 columns run them), off elsewhere; RuntimeTransformer.set_fusion forces either
        self.fuse: Optional[bool] = None

    def quantized_linears(self):
        a1, a2, ffn = self.attn1, self.attn2, self.ffn
        return (a1.to_q, a1.to_k, a1.to_v, a1.to_out[0], a2.to_q, a2.to_out[0], ffn.net[0].proj, ffn.net[2])

    def fusable(self, x) -> bool:
        """The fused path needs every linear it fuses around quantized and on the Triton kernels."""
        linears = self.quantized_linears()
        fuse = on_hopper(x) if self.fuse is None else self.fuse
        return fuse and all(isinstance(m, QuantizedLinear) for m in linears) and \
            all(m._use_triton(x) for m in linears) and x.dtype in (torch.bfloat16, torch.float32)

    def forward(self, x, context, temb6, rope):
        mods = (self.scale_shift_table.float() + temb6.float()).chunk(6, 1)
        if self.fusable(x):
            return self.forward_fused(x, context, mods, rope)
        shift, scale, gate, c_shift, c_scale, c_gate = mods
        h = (fp32_layer_norm(x, self.eps) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, None, rope) * gate).type_as(x)
        h = fp32_layer_norm(x, self.eps, self.norm2).type_as(x) if self.norm2 is not None else x
        x = x + self.attn2(h, context).type_as(x)
        h = (fp32_layer_norm(x, self.eps) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)

    def forward_fused(self, x, context, mods, rope):
        """The same block with no separate element-wise pass around its quantized linears: norm + modulation write
        the codes of q, k, v (one kernel), the gated residual updates run in the output projections' GEMM epilogues,
        GELU in the FFN-up GEMM's. The same float32 formulas (``norm_quant``, ``qgemm.Epilogue``)."""
        B, S, K = x.shape
        dtype = x.dtype
        shift, scale, gate, c_shift, c_scale, c_gate = (m.reshape(B, K) for m in mods)
        a1, a2, ffn = self.attn1, self.attn2, self.ffn
        x2 = x.reshape(B * S, K).contiguous()
        groups, rows = a1.to_q.rows_and_groups(x2, B)
        qkv = (a1.to_q, a1.to_k, a1.to_v)
        acts = norm_quantize(x2, NormSpec(self.eps, shift=shift, scale=scale), [m.clip_target() for m in qkv],
                             groups, rows, use_triton=True)
        q, k, v = (m.matmul(a, dtype).view(B, S, K) for m, a in zip(qkv, acts))
        out = a1.attend_projected(q, k, v, rope).reshape(B * S, K)
        x2 = a1.to_out[0].matmul(a1.to_out[0].quantize(out, B), dtype, Epilogue("residual", x2, gate, rows))

        if self.norm2 is not None:
            spec = NormSpec(self.eps, weight=self.norm2.weight, bias=self.norm2.bias)
            act = norm_quantize(x2, spec, [a2.to_q.clip_target()], groups, rows, use_triton=True)[0]
        else:
            act = a2.to_q.quantize(x2, B)
        q = a2.to_q.matmul(act, dtype).view(B, S, K)
        out = a2.attend_projected(q, run_linear(a2.to_k, context), run_linear(a2.to_v, context)).reshape(B * S, K)
        x2 = a2.to_out[0].matmul(a2.to_out[0].quantize(out, B), dtype, Epilogue("residual", x2))

        up, down = ffn.net[0].proj, ffn.net[2]
        act = norm_quantize(x2, NormSpec(self.eps, shift=c_shift, scale=c_scale), [up.clip_target()], groups, rows,
                            use_triton=True)[0]
        h = up.matmul(act, dtype, Epilogue("gelu_tanh"))
        x2 = down.matmul(down.quantize(h, B), dtype, Epilogue("residual", x2, c_gate, rows))
        return x2.view(B, S, K)


def _rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] of the t, h, w axes (sizes head_dim - 4*(d//6), 2*(d//6), 2*(d//6)), each
    frequency repeated twice (interleaved pairs), float64 as diffusers builds them."""
    hw = 2 * (head_dim // 6)
    cos, sin = [], []
    for d in (head_dim - 2 * hw, hw, hw):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


class WanRuntimeTransformer(RuntimeTransformer):
    CLASS_NAME = "WanTransformer3DModel"
    DTYPE_SOURCE = "patch_embedding.weight"
    IGNORED_TENSORS = ("rope.freqs_cos", "rope.freqs_sin")   # diffusers' rotary buffers, recomputed here

    def __init__(self, config: Mapping, quant_config: Optional[QuantizationConfig] = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        cfg = self.config = wan_config(config)
        self.quant_config = quant_config
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        q = quant_config
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, cfg.patch_size, cfg.patch_size, dtype=dtype)
        emb = self.condition_embedder = nn.Module()
        emb.time_embedder = nn.Module()
        emb.time_embedder.linear_1 = runtime_linear("condition_embedder.time_embedder.linear_1", cfg.freq_dim, dim,
                                                    q, dtype)
        emb.time_embedder.linear_2 = runtime_linear("condition_embedder.time_embedder.linear_2", dim, dim, q, dtype)
        emb.time_proj = runtime_linear("condition_embedder.time_proj", dim, 6 * dim, q, dtype)
        emb.text_embedder = nn.Module()
        emb.text_embedder.linear_1 = runtime_linear("condition_embedder.text_embedder.linear_1", cfg.text_dim, dim,
                                                    q, dtype)
        emb.text_embedder.linear_2 = runtime_linear("condition_embedder.text_embedder.linear_2", dim, dim, q, dtype)
        self.blocks = nn.ModuleList([_Block(f"blocks.{i}", cfg, q, dtype) for i in range(cfg.num_layers)])
        self.proj_out = runtime_linear("proj_out", dim, cfg.out_channels * math.prod(cfg.patch_size), q, dtype)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, dim, dtype=dtype))
        cos, sin = _rope_tables(cfg.attention_head_dim, cfg.rope_max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.check_quantized_modules()

    # ------------------------------------------------------------------ forward
    def _rope(self, frames: int, height: int, width: int):
        cfg = self.config
        t_dim = cfg.attention_head_dim - 4 * (cfg.attention_head_dim // 6)
        splits = (t_dim, 2 * (cfg.attention_head_dim // 6), 2 * (cfg.attention_head_dim // 6))
        out = []
        for table in (self.rope_cos, self.rope_sin):
            ft, fh, fw = table.float().split(splits, dim=1)
            grid = torch.cat([ft[:frames].view(frames, 1, 1, -1).expand(frames, height, width, -1),
                              fh[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
                              fw[:width].view(1, 1, width, -1).expand(frames, height, width, -1)], dim=-1)
            out.append(grid.reshape(1, frames * height * width, 1, -1))
        return tuple(out)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: Optional[torch.Tensor] = None, return_dict: bool = True,
                attention_kwargs: Optional[dict] = None):
        if encoder_hidden_states_image is not None:
            raise ValueError("the runtime Wan transformer is text-to-video only (no encoder_hidden_states_image)")
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)
        graphed = self.graphed(hidden_states)
        if graphed is not None:
            return graphed(hidden_states, timestep, encoder_hidden_states, None, return_dict, attention_kwargs)
        cfg = self.config
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = cfg.patch_size
        f, h, w = frames // p_t, height // p_h, width // p_w
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        if timestep.numel() != batch:
            raise ValueError(f"timestep must hold one value per sample (got {timestep.numel()} for {batch}); "
                             "per-token timesteps (Wan 2.2) are not supported")
        groups = codes.timestep_group(timestep.detach(), self.timestep_group_count())    # on the device: no sync

        with timestep_groups(groups.to(hidden_states.device)):
            rope = self._rope(f, h, w)
            x = self.patch_embedding(hidden_states.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
            emb = self.condition_embedder
            temb = run_linear(emb.time_embedder.linear_2, F.silu(run_linear(
                emb.time_embedder.linear_1, timestep_sinusoids(timestep, cfg.freq_dim)))).type_as(x)
            temb6 = run_linear(emb.time_proj, F.silu(temb)).unflatten(1, (6, -1))
            context = run_linear(emb.text_embedder.linear_2, F.gelu(run_linear(
                emb.text_embedder.linear_1, encoder_hidden_states.to(self.dtype)), approximate="tanh")).type_as(x)
            for block in self.blocks:
                x = block(x, context, temb6, rope)
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)   # in the model dtype
            x = (fp32_layer_norm(x, cfg.eps) * (1 + scale) + shift).type_as(x)
            x = run_linear(self.proj_out, x).type_as(x)

        x = x.reshape(batch, f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return WanRuntimeOutput(out) if return_dict else (out,)
