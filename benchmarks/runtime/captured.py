"""The quantized attention on the activations the runtime itself produces, not on Gaussian noise.

One forward of a W4A4 runtime model (random weights, the benchmark's real shapes) with bf16 attention: at every
attention call the q, k, v the model hands over (after its q/k norms and RoPE, as SDPA sees them) are also run through
the int8 kernel (the torch twin on a CPU without the interpreter) and compared per call with SDPA (all rows) and with
float64 attention (``rows`` sampled query rows). A model's norms, RoPE and projections give q, k, v a structure
(a shared mean in K, per-channel outliers, RoPE-rotated pairs) that the attention section's Gaussian inputs lack.
Weights are random here (no checkpoint can be downloaded): trained activations are the CPU run of
``attention_fidelity.py`` on the in-repo teacher.
"""
from __future__ import annotations

import torch

from columns import make
from quality import attention_quality

from qvgen_kernels import cogvideox_model, wan_model


@torch.no_grad()
def captured_attention(spec: dict, rows: int = 128) -> dict:
    """Per-call cosines of our kernel against SDPA and float64 on one forward's own q, k, v, and their minimum per
    kind of call (self / joint, or Wan's cross-attention to the text)."""
    module = wan_model if spec["kind"] == "wan" else cogvideox_model
    model, forward, _ = make("ours_bf16_attn", spec)
    real, calls = module.attention, []

    def spy(q, k, v, mode="bf16"):
        out = real(q, k, v, mode)
        quality = attention_quality(q, k, v, real(q, k, v, "int8"), rows)     # the runtime's own int8 dispatch
        calls.append(dict(kind="cross" if k.shape[1] != q.shape[1] else "self", tokens=q.shape[1],
                          kv_tokens=k.shape[1], heads=q.shape[2], head_dim=q.shape[3], **quality))
        return out

    module.attention = spy
    try:
        forward()
    finally:
        module.attention = real
    del model, forward
    res = dict(calls=calls)
    for kind in sorted({c["kind"] for c in calls}):
        mine = [c for c in calls if c["kind"] == kind]
        res[kind] = dict(calls=len(mine), tokens=mine[0]["tokens"], kv_tokens=mine[0]["kv_tokens"],
                         min_cosine_vs_sdpa=min(c["cosine_vs_sdpa"] for c in mine),
                         min_cosine_vs_float64=min(c["cosine_vs_float64"] for c in mine))
    return res
