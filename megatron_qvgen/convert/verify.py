"""Run a diffusers transformer and its converted megatron checkpoint on the same random input.

Collective: call on every rank of a job whose world size is a multiple of TP x PP (torchrun, or one
process for TP = PP = 1). The megatron model runs at the requested layout through megatron's pipeline
schedule; then the rank holding the prediction (last stage, first TP rank, first DP rank) frees it,
runs diffusers' model and returns the differences (None on other ranks).
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_qvgen.config import ParallelConfig
from megatron_qvgen.convert.diffusers_call import diffusers_forward
from megatron_qvgen.convert.diffusers_io import load_diffusers_model, transformer_dir
from megatron_qvgen.convert.diffusers_io import read_model_config as read_diffusers_config
from megatron_qvgen.convert.checkpoint_io import load_model, read_model_config
from megatron_qvgen.convert.errors import ConversionError


@dataclass
class Difference:
    max_abs: float
    max_rel: float  # max |ours - diffusers| / max |diffusers|
    reference_max: float
    shape: tuple


def random_inputs(model_cfg, *, batch: int = 1, latent_frames: int = 2, latent_height: int = 8,
                  latent_width: int = 8, text_len: Optional[int] = None, seed: int = 0):
    """The same inputs on every rank, in diffusers' layout of the arch: latents (B, C, F, H, W) for Wan,
    (B, F, C, H, W) for CogVideoX; timesteps (B,); text (B, L, D); float32. Sizes count patches.

    ``text_len`` None: 16 tokens for Wan; CogVideoX's ``max_text_seq_length`` (diffusers' 2B model adds
    its position table to exactly that many text tokens)."""
    if text_len is None:
        text_len = 16 if model_cfg.arch == "wan" else model_cfg.text_len
    gen = torch.Generator().manual_seed(seed)
    if model_cfg.arch == "wan":
        pt, ph, pw = model_cfg.patch_size
        shape = (batch, model_cfg.in_channels, latent_frames * pt, latent_height * ph, latent_width * pw)
        text_dim = model_cfg.text_dim
    else:
        p = model_cfg.patch_size
        shape = (batch, latent_frames, model_cfg.in_channels, latent_height * p, latent_width * p)
        text_dim = model_cfg.text_embed_dim
    latents = torch.randn(*shape, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen).float()
    text = torch.randn(batch, text_len, text_dim, generator=gen)
    return {"latents": latents, "timestep": timestep, "text_embeds": text}


def verify_conversion(diffusers_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, *, tensor_parallel: int = 1,
                      pipeline_parallel: int = 1, sequence_parallel: bool = False,
                      dtype: torch.dtype = torch.float32, seed: int = 0, **input_sizes) -> Optional[Difference]:
    from megatron.core import parallel_state

    from megatron_qvgen.models import build_model_chunks
    from megatron_qvgen.models.common.schedule import run_pipeline
    from megatron_qvgen.parallel import initialize_parallel

    folder = transformer_dir(diffusers_dir)
    model_cfg = read_model_config(ckpt_dir)
    reference_cfg = read_diffusers_config(folder, model_cfg.arch)
    if reference_cfg != model_cfg:
        raise ConversionError(f"{ckpt_dir} holds {model_cfg} but {folder} is {reference_cfg}")
    parallel_cfg = ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                  sequence_parallel=sequence_parallel)
    initialize_parallel(parallel_cfg, seed=seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    chunks = build_model_chunks(model_cfg, parallel_cfg, params_dtype=dtype, perform_initialization=False)
    load_model(chunks, ckpt_dir, model_cfg)
    batch = {k: v.to(device) for k, v in random_inputs(model_cfg, seed=seed, **input_sizes).items()}
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad(), _full_fp32():
        outputs = run_pipeline(chunks, [batch], forward_only=True)
    reporter = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)
    del chunks
    gc.collect()
    if not reporter:
        return None
    ours = outputs[0].float()
    del outputs
    reference = _diffusers_prediction(folder, model_cfg.arch, batch, dtype, device)
    diff = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    return Difference(max_abs=diff, max_rel=diff / max(scale, 1e-30), reference_max=scale,
                      shape=tuple(reference.shape))


@contextlib.contextmanager
def _full_fp32():
    """TF32 off for both models (cuDNN convolutions use it by default): fp32 comparisons stay fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _diffusers_prediction(folder, arch, batch, dtype, device) -> torch.Tensor:
    model = load_diffusers_model(folder, arch, dtype).to(device).eval()
    with torch.no_grad(), _full_fp32():
        out = diffusers_forward(model, arch, batch["latents"].to(dtype), batch["timestep"],
                                batch["text_embeds"].to(dtype))
    return out.float()
