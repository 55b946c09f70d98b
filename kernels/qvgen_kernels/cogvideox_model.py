"""Runtime CogVideoX 1.0 text-to-video transformer: diffusers' CogVideoXTransformer3DModel math with the quantized
linears of an export (2B: 3D sin-cos positions added to the video tokens; 5B: 3D RoPE on their q/k).

Loads an export folder (``format``): every linear listed in its quantization config is a
:class:`QuantizedLinear`, the others plain ``nn.Linear``; module names are diffusers' names. Each forward maps
the sampler timesteps to their timestep groups (``codes.timestep_group``, as in training).

Text and video travel as one joint sequence [b, text + video, h], text first, as in training
(``megatron_qvgen.models.cogvideox``): every linear, norm and the FFN act per token, so only the adaLN
modulation and the gates treat the two streams apart, and each quantized linear runs once per block position.

It serves as the ``transformer`` of diffusers' ``CogVideoXPipeline``: same forward signature, ``config``
(attribute access), ``dtype``, ``device`` and ``cache_context``. The 5B model uses the ``image_rotary_emb`` the
pipeline passes, or computes the same tables itself when called without them. CogVideoX 1.5 (``patch_size_t``,
``ofs``) and the image-to-video models (learned positions) are refused.
"""
from __future__ import annotations

import collections
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import codes
from .attention import QKPrep, attention, triton_usable
from .context import timestep_groups
from .format import QuantizationConfig
from .runtime_parts import (RuntimeConfig, RuntimeTransformer, apply_interleaved_rope, fp32_layer_norm, run_linear,
                            runtime_config, runtime_linear, timestep_sinusoids)

_DEFAULTS = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
                 freq_shift=0, time_embed_dim=512, ofs_embed_dim=None, text_embed_dim=4096, num_layers=30, dropout=0.0,
                 attention_bias=True, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                 patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=226,
                 activation_fn="gelu-approximate", timestep_activation_fn="silu", norm_elementwise_affine=True,
                 norm_eps=1e-5, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
                 use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False, patch_bias=True)
QK_NORM_EPS = 1e-6          # diffusers builds CogVideoX's per-head q/k LayerNorm with eps=1e-6 whatever norm_eps is
_FIXED = dict(patch_size_t=None, ofs_embed_dim=None, use_learned_positional_embeddings=False,
              activation_fn="gelu-approximate", timestep_activation_fn="silu", norm_elementwise_affine=True)

CogVideoXRuntimeOutput = collections.namedtuple("CogVideoXRuntimeOutput", ["sample"])  # .sample and [0]
Grid = Tuple[int, int, int]          # latent frames, rows and columns of patches


def cogvideox_config(config: Mapping) -> RuntimeConfig:
    cfg = runtime_config(_DEFAULTS, config)
    cfg["out_channels"] = cfg["out_channels"] or cfg["in_channels"]
    for key, allowed in _FIXED.items():
        if cfg[key] != allowed:
            raise ValueError(f"{key}={cfg[key]!r}: the runtime CogVideoX transformer runs CogVideoX 1.0 text-to-video "
                             f"only ({key}={allowed!r}; 1.5 and the image-to-video models are not supported)")
    if cfg.use_rotary_positional_embeddings and cfg.attention_head_dim % 16:
        raise ValueError(f"attention_head_dim={cfg.attention_head_dim} must be a multiple of 16 for the 3D RoPE "
                         "(a head splits 4/16 : 6/16 : 6/16 over time, height, width)")
    if not cfg.use_rotary_positional_embeddings and (cfg.num_attention_heads * cfg.attention_head_dim) % 16:
        raise ValueError("num_attention_heads x attention_head_dim must be a multiple of 16 for the 3D sin-cos "
                         "positions")
    return cfg


# ---------------------------------------------------------------------------- position tables (diffusers' math)
def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len, dim] float64: sin | cos of float32 positions times 10000^(-i / (dim/2)) (frequencies in float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.outer(positions.to(torch.float64), omega)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_positions(cfg: RuntimeConfig, grid: Grid) -> torch.Tensor:
    """The 2B model's table [frames * rows * cols, hidden] in float64, tokens frame-major then row-major: a quarter
    of the channels for the frame, then 3/8 for the column and 3/8 for the row (positions divided in float32 by the
    interpolation scales, as diffusers' ``get_3d_sincos_pos_embed``)."""
    frames, rows, cols = grid
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    spatial, temporal = 3 * dim // 4, dim // 4
    col = _sincos_1d(spatial // 2, torch.arange(cols, dtype=torch.float32) / cfg.spatial_interpolation_scale)
    row = _sincos_1d(spatial // 2, torch.arange(rows, dtype=torch.float32) / cfg.spatial_interpolation_scale)
    frame = _sincos_1d(temporal, torch.arange(frames, dtype=torch.float32) / cfg.temporal_interpolation_scale)
    spatial_emb = torch.cat([col.view(1, cols, -1).expand(rows, cols, -1),
                             row.view(rows, 1, -1).expand(rows, cols, -1)], dim=-1).reshape(1, rows * cols, spatial)
    table = torch.cat([frame.view(frames, 1, temporal).expand(frames, rows * cols, temporal),
                       spatial_emb.expand(frames, rows * cols, spatial)], dim=-1)
    return table.reshape(frames * rows * cols, dim)


def _crop_region(rows: int, cols: int, base_rows: int, base_cols: int):
    """Centred region of the training grid with the aspect of (rows, cols): the pipeline's
    ``get_resize_crop_region_for_grid``."""
    if rows / cols > base_rows / base_cols:
        height, width = base_rows, int(round(base_rows / rows * cols))
    else:
        width, height = base_cols, int(round(base_cols / cols * rows))
    top, left = int(round((base_rows - height) / 2.0)), int(round((base_cols - width) / 2.0))
    return (top, left), (top + height, left + width)


def rotary_positions(cfg: RuntimeConfig, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 5B model's cos, sin [frames * rows * cols, head_dim] float32, as CogVideoXPipeline computes its
    ``image_rotary_emb``: head split 1/4 time, 3/8 rows, 3/8 columns; spatial positions spread over the crop of
    the training grid; angles in float32."""
    frames, rows, cols = grid
    p = cfg.patch_size
    (top, left), (bottom, right) = _crop_region(rows, cols, cfg.sample_height // p, cfg.sample_width // p)
    positions = (torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32),
                 torch.linspace(top, bottom * (rows - 1) / rows, rows, dtype=torch.float32),
                 torch.linspace(left, right * (cols - 1) / cols, cols, dtype=torch.float32))
    d = cfg.attention_head_dim
    angles = []
    for axis_dim, pos in zip((d // 4, d // 8 * 3, d // 8 * 3), positions):
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim))
        angles.append(torch.outer(pos, inv_freq))
    grid_angles = torch.cat([angles[0].view(frames, 1, 1, -1).expand(frames, rows, cols, -1),
                             angles[1].view(1, rows, 1, -1).expand(frames, rows, cols, -1),
                             angles[2].view(1, 1, cols, -1).expand(frames, rows, cols, -1)], dim=-1)
    grid_angles = grid_angles.reshape(frames * rows * cols, -1)
    return grid_angles.cos().repeat_interleave(2, dim=1), grid_angles.sin().repeat_interleave(2, dim=1)


# ---------------------------------------------------------------------------- modules
def _per_stream(x: torch.Tensor, text_len: int, on_text, on_video) -> torch.Tensor:
    return torch.cat([on_text(x[:, :text_len]), on_video(x[:, text_len:])], dim=1)


class _LayerNormZero(nn.Module):
    """diffusers' ``CogVideoXLayerNormZero``: one LayerNorm, shift/scale/gate for video then for text."""

    def __init__(self, prefix: str, cfg: RuntimeConfig, quant, dtype):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.eps = cfg.norm_eps
        self.linear = runtime_linear(f"{prefix}.linear", cfg.time_embed_dim, 6 * dim, quant, dtype)
        self.norm = nn.LayerNorm(dim, cfg.norm_eps, dtype=dtype)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_len: int):
        shift, scale, gate, t_shift, t_scale, t_gate = (
            v[:, None, :] for v in run_linear(self.linear, F.silu(temb)).chunk(6, dim=1))
        h = fp32_layer_norm(x, self.eps, self.norm).type_as(x)
        h = _per_stream(h, text_len, lambda t: t * (1 + t_scale) + t_shift, lambda v: v * (1 + scale) + shift)
        return h, (t_gate, gate)


def _gated(update: torch.Tensor, gates, text_len: int) -> torch.Tensor:
    text_gate, video_gate = gates
    return _per_stream(update, text_len, lambda t: t * text_gate, lambda v: v * video_gate)


class _Attention(nn.Module):
    """Joint self-attention with per-head q/k LayerNorm (one affine of head size) and RoPE on video tokens."""

    cross_attention = False      # text and video tokens attend to all of them: the quantized kernel's case

    def __init__(self, prefix: str, cfg: RuntimeConfig, quant, dtype):
        super().__init__()
        self.heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        dim = self.heads * head_dim
        for name in ("to_q", "to_k", "to_v"):
            setattr(self, name, runtime_linear(f"{prefix}.{name}", dim, dim, quant, dtype, bias=cfg.attention_bias))
        self.norm_q = nn.LayerNorm(head_dim, QK_NORM_EPS, dtype=dtype)
        self.norm_k = nn.LayerNorm(head_dim, QK_NORM_EPS, dtype=dtype)
        self.to_out = nn.ModuleList([runtime_linear(f"{prefix}.to_out.0", dim, dim, quant, dtype)])
        self.attention_mode = "bf16"
        self.attention_config = None         # the quantized kernel's AttentionConfig (None: default per head dim)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        q, k, v = (run_linear(proj, x).unflatten(-1, (self.heads, -1)) for proj in (self.to_q, self.to_k, self.to_v))
        if self.attention_mode == "int8" and triton_usable(q):
            from .attention_triton import quantized_attention_triton     # norm and RoPE fused into quantization
            cos, sin = rope if rope is not None else (None, None)
            start = x.shape[1] - (cos.shape[0] if rope is not None else 0)
            prep = [QKPrep("layer_head", norm.weight, norm.bias, QK_NORM_EPS, cos, sin, start)
                    for norm in (self.norm_q, self.norm_k)]
            out = quantized_attention_triton(q.type_as(x), k.type_as(x), v.type_as(x), *prep,
                                             config=self.attention_config)
            return run_linear(self.to_out[0], out.flatten(2))
        q = fp32_layer_norm(q, QK_NORM_EPS, self.norm_q).type_as(x)
        k = fp32_layer_norm(k, QK_NORM_EPS, self.norm_k).type_as(x)
        if rope is not None:
            cos, sin = (t[None, :, None, :] for t in rope)
            n = cos.shape[1]
            q = torch.cat([q[:, :-n], apply_interleaved_rope(q[:, -n:], cos, sin)], dim=1)
            k = torch.cat([k[:, :-n], apply_interleaved_rope(k[:, -n:], cos, sin)], dim=1)
        out = attention(q, k, v.type_as(x), self.attention_mode)
        return run_linear(self.to_out[0], out.flatten(2).type_as(x))


class _FeedForward(nn.Module):
    """diffusers FeedForward(gelu-approximate): ``net.0.proj`` -> GELU(tanh) -> ``net.2``."""

    def __init__(self, prefix: str, dim: int, quant, dtype):
        super().__init__()
        first = nn.Module()
        first.proj = runtime_linear(f"{prefix}.net.0.proj", dim, 4 * dim, quant, dtype)
        self.net = nn.ModuleList([first, nn.Identity(), runtime_linear(f"{prefix}.net.2", 4 * dim, dim, quant, dtype)])

    def forward(self, x):
        return run_linear(self.net[2], F.gelu(run_linear(self.net[0].proj, x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, prefix: str, cfg: RuntimeConfig, quant, dtype):
        super().__init__()
        self.norm1 = _LayerNormZero(f"{prefix}.norm1", cfg, quant, dtype)
        self.attn1 = _Attention(f"{prefix}.attn1", cfg, quant, dtype)
        self.norm2 = _LayerNormZero(f"{prefix}.norm2", cfg, quant, dtype)
        self.ff = _FeedForward(f"{prefix}.ff", cfg.num_attention_heads * cfg.attention_head_dim, quant, dtype)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_len: int, rope) -> torch.Tensor:
        h, gates = self.norm1(x, temb, text_len)
        x = x + _gated(self.attn1(h, rope), gates, text_len)
        h, gates = self.norm2(x, temb, text_len)
        return x + _gated(self.ff(h), gates, text_len)


class CogVideoXRuntimeTransformer(RuntimeTransformer):
    CLASS_NAME = "CogVideoXTransformer3DModel"
    DTYPE_SOURCE = "patch_embed.proj.weight"
    IGNORED_TENSORS = ("patch_embed.pos_embedding",)     # diffusers' sin-cos buffer, recomputed here
    _KEEP_TABLES = 4

    def __init__(self, config: Mapping, quant_config: Optional[QuantizationConfig] = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        cfg = self.config = cogvideox_config(config)
        self.quant_config = q = quant_config
        dim, p, temb = cfg.num_attention_heads * cfg.attention_head_dim, cfg.patch_size, cfg.time_embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_channels, dim, p, p, bias=cfg.patch_bias, dtype=dtype)
        self.patch_embed.text_proj = runtime_linear("patch_embed.text_proj", cfg.text_embed_dim, dim, q, dtype)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = runtime_linear("time_embedding.linear_1", dim, temb, q, dtype)
        self.time_embedding.linear_2 = runtime_linear("time_embedding.linear_2", temb, temb, q, dtype)
        self.transformer_blocks = nn.ModuleList([_Block(f"transformer_blocks.{i}", cfg, q, dtype)
                                                 for i in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(dim, cfg.norm_eps, dtype=dtype)
        self.norm_out = nn.Module()
        self.norm_out.linear = runtime_linear("norm_out.linear", temb, 2 * dim, q, dtype)
        self.norm_out.norm = nn.LayerNorm(dim, cfg.norm_eps, dtype=dtype)
        self.proj_out = runtime_linear("proj_out", dim, p * p * cfg.out_channels, q, dtype)
        self._tables: Dict[tuple, object] = {}
        self.check_quantized_modules()

    # ------------------------------------------------------------------ positions
    def _cached(self, key: tuple, make):
        if key not in self._tables:
            if len(self._tables) >= self._KEEP_TABLES:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = make()
        return self._tables[key]

    def _sincos(self, grid: Grid, device, dtype) -> torch.Tensor:
        """Cast once from float64 to the activation dtype, as diffusers casts its table."""
        return self._cached(("sincos", grid, device, dtype),
                            lambda: sincos_positions(self.config, grid).to(device=device, dtype=dtype))

    def _rotary(self, grid: Grid, device, given) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens, head_dim = grid[0] * grid[1] * grid[2], self.config.attention_head_dim
        if given is None:
            return self._cached(("rope", grid, device),
                                lambda: tuple(t.to(device) for t in rotary_positions(self.config, grid)))
        cos, sin = given
        if tuple(cos.shape) != (tokens, head_dim) or tuple(sin.shape) != (tokens, head_dim):
            raise ValueError(f"image_rotary_emb must be (cos, sin) of shape [{tokens}, {head_dim}] for a "
                             f"{grid} token grid, got {list(cos.shape)} and {list(sin.shape)}")
        return cos.to(device=device, dtype=torch.float32), sin.to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, hidden_states, encoder_hidden_states, timestep_cond, ofs, attention_kwargs) -> Grid:
        cfg = self.config
        if timestep_cond is not None or ofs is not None:
            raise ValueError("timestep_cond / ofs are not supported: CogVideoX 1.0 text-to-video takes neither")
        if attention_kwargs:
            raise ValueError(f"attention_kwargs {sorted(attention_kwargs)} are not supported by the runtime "
                             "(no LoRA scale, no attention mask)")
        if hidden_states.ndim != 5 or hidden_states.shape[2] != cfg.in_channels:
            raise ValueError(f"hidden_states must be (B, F, C={cfg.in_channels}, H, W), "
                             f"got {tuple(hidden_states.shape)}")
        batch, frames, _, height, width = hidden_states.shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"latent size (H, W) = {(height, width)} is not divisible by patch {cfg.patch_size}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch or \
                encoder_hidden_states.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"encoder_hidden_states must be (B={batch}, L, {cfg.text_embed_dim}), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        return frames, height // cfg.patch_size, width // cfg.patch_size

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep,
                timestep_cond: Optional[torch.Tensor] = None, ofs=None,
                image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                attention_kwargs: Optional[dict] = None, return_dict: bool = True):
        """hidden_states (B, F, C, H, W) latents; encoder_hidden_states (B, L, text_embed_dim); one timestep per
        sample (or one for all). Returns the prediction (B, F, C_out, H, W) in the model dtype."""
        cfg = self.config
        grid = self._check_inputs(hidden_states, encoder_hidden_states, timestep_cond, ofs, attention_kwargs)
        batch, device, dtype = hidden_states.shape[0], hidden_states.device, self.dtype
        timestep = torch.as_tensor(timestep, device=device).reshape(-1)
        graphed = self.graphed(hidden_states)
        if graphed is not None:
            return graphed(hidden_states, encoder_hidden_states, timestep, None, None, image_rotary_emb, None,
                           return_dict)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        if timestep.numel() != batch:
            raise ValueError(f"timestep must hold one value per sample (got {timestep.numel()} for {batch})")
        groups = codes.timestep_group(timestep.detach(), self.timestep_group_count())    # on the device: no sync
        text_len = encoder_hidden_states.shape[1]
        rope = None
        if image_rotary_emb is not None or cfg.use_rotary_positional_embeddings:
            rope = self._rotary(grid, device, image_rotary_emb)

        with timestep_groups(groups.to(device)):
            features = timestep_sinusoids(timestep, cfg.num_attention_heads * cfg.attention_head_dim,
                                          flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
            te = self.time_embedding
            temb = run_linear(te.linear_2, F.silu(run_linear(te.linear_1, features.to(dtype))))
            x = self._embed(hidden_states, encoder_hidden_states, grid)
            for block in self.transformer_blocks:
                x = block(x, temb, text_len, rope)
            video = fp32_layer_norm(x[:, text_len:], cfg.norm_eps, self.norm_final).type_as(x)
            shift, scale = (v[:, None, :] for v in run_linear(self.norm_out.linear, F.silu(temb)).chunk(2, dim=1))
            video = fp32_layer_norm(video, cfg.norm_eps, self.norm_out.norm).type_as(x) * (1 + scale) + shift
            out = run_linear(self.proj_out, video).type_as(x)

        p, (frames, rows, cols) = cfg.patch_size, grid
        out = out.reshape(batch, frames, rows, cols, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        return CogVideoXRuntimeOutput(out) if return_dict else (out,)

    def _embed(self, latents: torch.Tensor, text: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The joint [text; video] sequence [b, L + F*H'*W', hidden] (video tokens frame-major, then row-major)."""
        batch, frames, channels, height, width = latents.shape
        dtype = self.dtype
        video = self.patch_embed.proj(latents.reshape(batch * frames, channels, height, width).to(dtype))
        video = video.flatten(2).transpose(1, 2).reshape(batch, -1, video.shape[1])
        if not self.config.use_rotary_positional_embeddings:
            video = video + self._sincos(grid, video.device, video.dtype)
        text = run_linear(self.patch_embed.text_proj, text.to(dtype)).type_as(video)
        return torch.cat([text, video], dim=1)
