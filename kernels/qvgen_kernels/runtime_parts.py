"""What the runtime transformers (Wan, CogVideoX) share: linear construction from an export, the fp32 norms,
rotary and timestep features, loading an export folder and the attributes diffusers pipelines read.

Each runtime model is diffusers' module tree with the same module names, so an export's tensor names are the
diffusers state-dict keys: a linear listed in the quantization config becomes a :class:`QuantizedLinear`,
every other linear a plain ``nn.Linear`` in the model dtype.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import cross_attention_mode, default_mode
from .cuda_graph import GraphedCall
from .format import ExportFormatError, QuantizationConfig, load_export
from .linear import QuantizedLinear


class RuntimeConfig(dict):
    """The diffusers config dict with attribute access (pipelines read ``transformer.config.patch_size``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def runtime_config(defaults: Mapping, config: Mapping) -> RuntimeConfig:
    """diffusers defaults overridden by ``config``, without its private keys (``_class_name``, ...)."""
    return RuntimeConfig({**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}})


def runtime_linear(name: str, in_f: int, out_f: int, quant: Optional[QuantizationConfig], dtype,
                   bias: bool = True) -> nn.Module:
    """A QuantizedLinear if the export quantizes ``name``, else a plain ``nn.Linear`` in ``dtype``."""
    if quant is not None and name in quant.module_shapes:
        if quant.module_shapes[name] != (out_f, in_f):
            raise ValueError(f"{name}: the export says [out, in] = {list(quant.module_shapes[name])}, the model "
                             f"config needs {[out_f, in_f]}")
        return QuantizedLinear(in_f, out_f, quant.weight_bits, quant.act_bits, quant.act_clip_ratio,
                               quant.num_timestep_groups, bias=bias)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def run_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bf16 nn.Linear needs its own dtype; a QuantizedLinear takes any float input and keeps its dtype."""
    if isinstance(linear, nn.Linear):
        return linear(x.to(linear.weight.dtype))
    return linear(x)


def fp32_layer_norm(x: torch.Tensor, eps: float, norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
    """FP32LayerNorm over the last dimension: statistics and affine in float32 (returns float32)."""
    if norm is None:
        return F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return F.layer_norm(x.float(), x.shape[-1:], norm.weight.float(), norm.bias.float(), eps)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of pairs (2i, 2i+1) of x [..., head_dim], computed in float32. ``cos``/``sin``
    broadcast against x and hold each frequency twice (diffusers' ``repeat_interleave_real``)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


def timestep_sinusoids(t: torch.Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0) -> torch.Tensor:
    """diffusers ``Timesteps``: [cos, sin] (flipped) or [sin, cos] of t * exp(-ln(P) i / (half - shift)), float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - downscale_freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    halves = [torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(halves, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class RuntimeTransformer(nn.Module):
    """Loading and the pipeline-facing attributes of a runtime transformer.

    Subclasses build diffusers' module tree in ``__init__(config, quant_config, dtype)`` and name
    ``CLASS_NAME`` (diffusers' class, checked against an export's ``_class_name``), ``DTYPE_SOURCE`` (the
    parameter whose dtype and device are the model's) and ``IGNORED_TENSORS`` (diffusers buffers recomputed
    here, accepted and dropped when loading).
    """

    CLASS_NAME: str = ""
    DTYPE_SOURCE: str = ""
    IGNORED_TENSORS: Iterable[str] = ()

    def check_quantized_modules(self) -> None:
        """Every module the export quantizes must exist in this model (else the export is for another model)."""
        q = getattr(self, "quant_config", None)
        expected = {n for n, m in self.named_modules() if isinstance(m, QuantizedLinear)}
        if q is not None and set(q.module_shapes) - expected:
            raise ValueError(f"the export quantizes modules this model does not have: "
                             f"{sorted(set(q.module_shapes) - expected)[:5]}")

    # ------------------------------------------------------------------ loading
    attention_mode = "bf16"

    def set_attention(self, mode: str, cross_attention: Optional[str] = None, config=None) -> "RuntimeTransformer":
        """``"bf16"`` (SDPA, diffusers' math) or ``"int8"`` (quantized attention, ``attention``) in every block's
        self-attention (CogVideoX: its joint attention). Attention modules with ``cross_attention`` set (Wan's
        ``attn2``, queries to the text) take ``attention.cross_attention_mode(mode, cross_attention)``: bf16 SDPA
        unless ``cross_attention`` asks otherwise (its docstring holds the measurement). ``config``: the quantized
        kernel's ``attention_triton.AttentionConfig`` (e.g. ``AttentionConfig.gluon()`` on Hopper); None: the default
        tiles."""
        cross = cross_attention_mode(mode, cross_attention)
        for module in self.modules():
            if hasattr(module, "attention_mode"):
                module.attention_mode = cross if getattr(module, "cross_attention", False) else mode
                module.attention_config = config
        return self

    def set_gemm(self, variant: Optional[str] = None) -> "RuntimeTransformer":
        """Every quantized linear's Triton GEMM kernel: None, each shape's ``qgemm_triton.default_config``; else
        that config with ``variant`` (``"gluon"``: the K loop with a product in flight, Hopper and int8 only)."""
        from .qgemm_triton import VARIANTS
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"GEMM variant must be None or one of {VARIANTS}, got {variant!r}")
        for module in self.modules():
            if hasattr(module, "gemm_variant"):
                module.gemm_variant = variant
        return self

    def set_fusion(self, enabled: Optional[bool] = True) -> "RuntimeTransformer":
        """Whether blocks take their fused path (norm + quantization in one kernel, epilogues in the GEMMs) where
        it applies (quantized linears on the Triton kernels); off: the same math in separate passes. None (the
        default of a new model): fused on Hopper (sm_90), unfused elsewhere."""
        for module in self.modules():
            if hasattr(module, "fuse"):
                module.fuse = None if enabled is None else bool(enabled)
        return self

    def enable_cuda_graphs(self, enabled: bool = True) -> "RuntimeTransformer":
        """Replay each forward on CUDA inputs as a CUDA graph captured per input shape (``cuda_graph``)."""
        self._graphed = GraphedCall(self.forward) if enabled else None
        return self

    def graphed(self, hidden_states: torch.Tensor) -> Optional[GraphedCall]:
        """The graph wrapper to route this call through, or None to run the forward directly."""
        g = getattr(self, "_graphed", None)
        return g if g is not None and not g.active and hidden_states.is_cuda else None

    @classmethod
    def from_export(cls, folder: os.PathLike, device: torch.device | str = "cpu", attention: Optional[str] = None):
        """``attention``: ``"int8"`` or ``"bf16"`` (``set_attention``: the cross-attention to the text stays bf16);
        None picks ``attention.default_mode(device)`` (int8 on Hopper, bf16 elsewhere)."""
        export = load_export(folder)
        declared = export.transformer_config.get("_class_name")
        if declared is not None and declared != cls.CLASS_NAME:
            raise ExportFormatError(f"{folder}: the export holds a {declared}, not a {cls.CLASS_NAME} "
                                    f"(load it with the matching runtime, or qvgen_kernels.runtime.load_transformer)")
        model = cls(export.transformer_config, export.quant_config)
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                module.load_export(export.linears[name])
        model.load_plain_tensors(export.tensors)
        return model.set_attention(attention or default_mode(device)).to(device)

    @classmethod
    def from_state_dict(cls, config: Mapping, state_dict: Mapping[str, torch.Tensor],
                        dtype: torch.dtype = torch.bfloat16):
        """The unquantized model from a diffusers state dict (every linear plain, in ``dtype``)."""
        model = cls(config, None, dtype)
        model.load_plain_tensors(state_dict)
        return model

    def load_plain_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Every non-quantized parameter, by diffusers name; missing or unexpected names raise."""
        own: Dict[str, torch.Tensor] = {k: v for k, v in self.state_dict().items()
                                        if not isinstance(self.get_submodule(k.rpartition(".")[0]), QuantizedLinear)}
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own) - set(self.IGNORED_TENSORS))
        if missing or unexpected:
            raise ValueError(f"tensors do not match the {self.CLASS_NAME} model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, dst in own.items():
                src = tensors[name]
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{name}: shape {list(src.shape)} != model {list(dst.shape)}")
                dst.copy_(src)

    # ------------------------------------------------------------------ what pipelines read
    @property
    def dtype(self) -> torch.dtype:
        return self.get_parameter(self.DTYPE_SOURCE).dtype

    @property
    def device(self) -> torch.device:
        return self.get_parameter(self.DTYPE_SOURCE).device

    def cache_context(self, name: str, **kwargs):
        return contextlib.nullcontext()

    def timestep_group_count(self) -> int:
        return self.quant_config.num_timestep_groups if self.quant_config is not None else 1
