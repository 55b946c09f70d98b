"""QuantizedLinear: the runtime linear of an export (packed weight codes, per-token activation quantization).

Forward: quantize the input per token with its sample's timestep-group clip factors (``context``), then the
integer GEMM with scales, zero points and bias in the epilogue. On CUDA tensors (or under
``TRITON_INTERPRET=1``) it runs the Triton kernels; otherwise the torch path, which computes the same
codes and the same exact integer sums.

Weight residency (``weight_residency``):
- ``"packed"`` (default): only the packed codes stay on the device (0.25x the bytes of bf16); each call
  unpacks them into a workspace shared by all linears on that device (stream-ordered, so reuse is safe on
  one stream). Costs one pass over 1.5 bytes a weight, small against the GEMM (benchmarks/kernels).
- ``"int8"``: an unpacked int8 copy stays resident as well (0.75x bf16 in all), no per-call unpack.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import codes
from .act_quant import QuantizedActivations, quantize_per_token_torch
from .context import current_timestep_groups
from .format import QuantizationConfig, QuantizedLinearExport
from .norm_quant import ClipTarget
from .qgemm import Epilogue, PackedWeight, apply_epilogue_torch, quant_matmul_torch
from .triton_env import INTERPRETER_HINT, interpreter_active

BACKENDS = ("auto", "triton", "torch")
_EXACT_BUFFERS = ("weight_scale", "weight_zero", "act_clip_lower", "act_clip_upper")
RESIDENCIES = ("packed", "int8")

_WORKSPACES: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (device, dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    return buf[:numel]


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, weight_bits: int, act_bits: int, act_clip_ratio: float,
                 num_timestep_groups: int, bias: bool = True, aux_rank: int = 0, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.act_bits = codes.check_bits(weight_bits), codes.check_bits(act_bits)
        if weight_bits > 4:
            raise ValueError(f"weight codes are packed two a byte: at most 4 bits, got {weight_bits}")
        self.act_clip_ratio = float(act_clip_ratio)
        self.num_timestep_groups = num_timestep_groups
        self.backend = "auto"
        self.weight_residency = "packed"
        self.gemm_variant: Optional[str] = None     # the Triton GEMM's default_config variant, or another of VARIANTS
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("weight_codes", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                         device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, **f32))
        self.register_buffer("weight_zero", torch.zeros(out_features, **f32))
        self.register_buffer("weight_colsum", torch.zeros(out_features, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("act_clip_lower", torch.ones(num_timestep_groups, **f32))
        self.register_buffer("act_clip_upper", torch.ones(num_timestep_groups, **f32))
        bf16 = dict(dtype=torch.bfloat16, device=device)
        self.register_buffer("bias", torch.zeros(out_features, **bf16) if bias else None)
        self.register_buffer("aux_left", torch.zeros(out_features, aux_rank, **bf16) if aux_rank else None)
        self.register_buffer("aux_right", torch.zeros(aux_rank, in_features, **bf16) if aux_rank else None)
        self._resident_codes: Optional[torch.Tensor] = None

    @classmethod
    def from_export(cls, linear: QuantizedLinearExport, config: QuantizationConfig, device=None) -> "QuantizedLinear":
        aux_rank = 0 if linear.aux_left is None else linear.aux_left.shape[1]
        module = cls(linear.in_features, linear.out_features, config.weight_bits, config.act_bits,
                     config.act_clip_ratio, config.num_timestep_groups, bias=linear.bias is not None,
                     aux_rank=aux_rank, device=device)
        module.load_export(linear)
        return module

    @torch.no_grad()
    def load_export(self, linear: QuantizedLinearExport) -> None:
        for name in ("weight_codes", "weight_scale", "weight_zero", "act_clip_lower", "act_clip_upper", "bias",
                     "aux_left", "aux_right"):
            src, dst = getattr(linear, name), getattr(self, name)
            if (src is None) != (dst is None):
                raise ValueError(f"{name}: export and module disagree on its presence")
            if src is not None:
                if src.shape != dst.shape:
                    raise ValueError(f"{name}: export shape {list(src.shape)} != module shape {list(dst.shape)}")
                dst.copy_(src)
        self.refresh_derived()

    @torch.no_grad()
    def refresh_derived(self) -> None:
        """Recompute what derives from the codes (column sums, resident unpacked copy) after they change."""
        self.weight_colsum.copy_(codes.unpack_codes(self.weight_codes, self.in_features).sum(dim=1, dtype=torch.int32))
        self._resident_codes = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_derived()

    def _apply(self, fn, recurse=True):
        """Device moves apply to every buffer; dtype casts (``model.to(torch.bfloat16)``) never reach the float32
        scales, zero points and clip factors that define the codes."""
        self._resident_codes = None
        exact = {name: getattr(self, name) for name in _EXACT_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in exact.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def packed_weight(self) -> PackedWeight:
        return PackedWeight(packed=self.weight_codes, scale=self.weight_scale, zero=self.weight_zero,
                            colsum=self.weight_colsum, in_features=self.in_features, bits=self.weight_bits)

    # ------------------------------------------------------------------ forward
    def _groups(self, batch: int, device: torch.device) -> torch.Tensor:
        groups = current_timestep_groups()
        if groups is None:
            if self.num_timestep_groups != 1:
                raise RuntimeError("QuantizedLinear needs the timestep groups of the forward: run it inside "
                                   "qvgen_kernels.context.timestep_groups(...)")
            groups = torch.zeros(1, dtype=torch.long)
        if groups.numel() not in (1, batch):
            raise ValueError(f"{groups.numel()} timestep groups for a batch of {batch}")
        if groups.device.type == "cpu" and int(groups.max()) >= self.num_timestep_groups:
            raise ValueError(f"timestep group {int(groups.max())} out of range for {self.num_timestep_groups} groups")
        return groups.to(device)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "torch" or self.act_bits > 7:
            return False
        if self.backend == "triton":
            if not (x.is_cuda or interpreter_active()):
                raise RuntimeError(f"the triton backend needs a CUDA tensor, or Triton's interpreter: {INTERPRETER_HINT}")
            return True
        return x.is_cuda

    def _weight_operand(self, device: torch.device) -> torch.Tensor:
        from .qgemm_triton import unpack_weight
        if self.weight_residency not in RESIDENCIES:
            raise ValueError(f"weight_residency must be one of {RESIDENCIES}, got {self.weight_residency!r}")
        if self.weight_residency == "int8":
            if self._resident_codes is None:
                self._resident_codes = unpack_weight(self.packed_weight())
            return self._resident_codes
        n, k = self.out_features, self.in_features
        return unpack_weight(self.packed_weight(), out=_workspace(n * k, torch.int8, device).view(n, k))

    def quantize_input(self, x2d: torch.Tensor, groups: torch.Tensor, rows_per_sample: int,
                       use_triton: bool) -> QuantizedActivations:
        args = (x2d, groups, rows_per_sample, self.act_clip_lower, self.act_clip_upper, self.act_clip_ratio,
                self.act_bits)
        if use_triton:
            from .act_quant_triton import quantize_per_token_triton
            return quantize_per_token_triton(*args)
        return quantize_per_token_torch(*args)

    def clip_target(self) -> ClipTarget:
        """What a fused producer (``norm_quant``) needs to write this layer's activation codes."""
        return ClipTarget(self.act_clip_lower, self.act_clip_upper, self.act_clip_ratio, self.act_bits)

    def rows_and_groups(self, x2d: torch.Tensor, batch: int) -> Tuple[torch.Tensor, int]:
        """The forward's timestep groups on x's device and the rows of each sample."""
        groups = self._groups(batch, x2d.device)
        return groups, (x2d.shape[0] // groups.numel() if groups.numel() else 1)

    def quantize(self, x2d: torch.Tensor, batch: int) -> QuantizedActivations:
        """Per-token codes of a [M, in_features] input holding ``batch`` samples (contiguous rows)."""
        groups, rows_per_sample = self.rows_and_groups(x2d, batch)
        return self.quantize_input(x2d, groups, rows_per_sample, self._use_triton(x2d))

    def matmul(self, act: QuantizedActivations, out_dtype: torch.dtype = torch.bfloat16,
               epilogue: Optional[Epilogue] = None) -> torch.Tensor:
        """[M, out_features] from activation codes: the GEMM (+ the side branch), then ``epilogue`` (fused in the
        Triton GEMM when there is no side branch, else applied after it by ``qgemm.apply_epilogue_torch``)."""
        use_triton = self._use_triton(act.codes)
        fused = epilogue if self.aux_left is None and use_triton else None
        if use_triton:
            from .qgemm_triton import default_config, quant_matmul_triton
            config = None if self.gemm_variant is None else default_config(
                act.codes.shape[0], self.out_features, self.in_features, self.gemm_variant)
            y = quant_matmul_triton(act, self.packed_weight(), self._weight_operand(act.codes.device), self.bias,
                                    out_dtype, config, epilogue=fused)
        else:
            y = quant_matmul_torch(act, self.packed_weight(), self.bias, out_dtype)
        if self.aux_left is not None:
            # the side branch sees the quantized input, as in training: Y = Qa(X) @ (Qw(W) + L R).T + b
            x_hat = codes.act_dequant(act.codes.float(), act.scale[:, None], act.zero[:, None]).to(self.aux_right.dtype)
            y = y + ((x_hat @ self.aux_right.T) @ self.aux_left.T).to(y.dtype)
        return y if fused is not None else apply_epilogue_torch(y, epilogue)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [..., in_features], batch first when there are several timestep groups."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) != self.in_features):
            x2d = x2d.contiguous()
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        y = self.matmul(self.quantize(x2d, lead[0] if lead else 1), out_dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.weight_bits}A{self.act_bits}, "
                f"groups={self.num_timestep_groups}, bias={self.bias is not None}, backend={self.backend}, "
                f"weight_residency={self.weight_residency}")
