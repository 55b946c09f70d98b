"""What a user would run instead of the W4A4 runtime, with random weights: diffusers' transformers in bf16 (eager,
torch.compile of the repeated blocks), with fp8 row-wise dynamic linears (``torch._scaled_mm``) and with
SageAttention 1.0.6 (PyPI's Triton-only wheel) in place of SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def diffusers_model(kind: str, cfg: dict, device: str):
    """diffusers' WanTransformer3DModel / CogVideoXTransformer3DModel, made on the device, bf16, eval."""
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
    cls = {"wan": WanTransformer3DModel, "cogvideox": CogVideoXTransformer3DModel}[kind]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**cfg)
    return model.to(torch.bfloat16).eval()


class Fp8RowwiseLinear(nn.Module):
    """y = x W^T + b with W in fp8 e4m3 (one scale per output channel, once) and x in fp8 e4m3 (one scale per token,
    every call, in eager torch ops): torchao's dynamic row-wise recipe on ``torch._scaled_mm``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)          # [N, 1]
        self.register_buffer("weight_fp8", (w / scale).to(FP8))
        self.register_buffer("weight_scale", scale.t().contiguous())                    # [1, N]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)  # [M, 1]
        xq = (x2.float() / scale).to(FP8)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=torch.bfloat16)
        return y.reshape(*x.shape[:-1], self.out_features)


def to_fp8_linears(model: nn.Module, blocks_attr: str) -> int:
    """Swap every nn.Linear inside the transformer blocks (dims multiples of 16) for :class:`Fp8RowwiseLinear`."""
    swapped = 0
    blocks = getattr(model, blocks_attr)
    for name, module in list(blocks.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(module, child_name, Fp8RowwiseLinear(child))
                swapped += 1
    return swapped


class SageForSdpa:
    """While entered, ``F.scaled_dot_product_attention`` is sageattention's ``sageattn`` for every call it can take
    (CUDA, no mask, no dropout, no GQA, head dim 64 / 96 / 128) and the original SDPA for the rest; ``calls``
    counts both, so a column shows whether the model's attention went through it.

    Why this route: diffusers' own ``sage`` backend needs sageattention >= 2.1.1 (CUDA kernels, not on PyPI), and
    CogVideoX's attention processor calls ``F.scaled_dot_product_attention`` directly, so no backend reaches it;
    replacing that function is the wheel's own plug-and-play recipe (its README)."""

    HOW = ("sageattention 1.0.6 sageattn in place of F.scaled_dot_product_attention (the wheel's README recipe), "
           "SDPA kept for calls it cannot take")

    def __init__(self):
        from sageattention import sageattn        # ImportError: the column reports it
        self.sageattn = sageattn
        self.calls = {"sageattn": 0, "sdpa": 0}
        self.original = None

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        if (query.is_cuda and attn_mask is None and dropout_p == 0.0 and not enable_gqa
                and query.shape[-1] in (64, 96, 128) and query.shape[1] == key.shape[1]):
            self.calls["sageattn"] += 1
            return self.sageattn(query, key, value, tensor_layout="HND", is_causal=is_causal, sm_scale=scale)
        self.calls["sdpa"] += 1
        return self.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)

    def __enter__(self):
        self.original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.original
