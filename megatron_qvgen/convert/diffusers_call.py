"""Run a diffusers transformer on our model's inputs, as diffusers' own pipelines call it.

Our models take ``(latents, timestep, text_embeds)`` in diffusers' layouts and compute everything else
themselves. diffusers' CogVideoX transformer takes its arguments in another order and expects the 5B
model's rotary tables from the pipeline (``CogVideoXPipeline._prepare_rotary_positional_embeddings``);
those are computed here with diffusers' own functions, so a comparison checks ours against theirs.
"""
from __future__ import annotations

import torch


def diffusers_forward(model, arch: str, latents: torch.Tensor, timestep: torch.Tensor,
                      text_embeds: torch.Tensor) -> torch.Tensor:
    """diffusers' prediction in its layout: Wan (B, C, F, H, W), CogVideoX (B, F, C, H, W)."""
    if arch == "wan":
        return model(latents, timestep, text_embeds, return_dict=False)[0]
    if arch == "cogvideox":
        rotary = cogvideox_rotary(model.config, latents.shape, latents.device)
        return model(hidden_states=latents, encoder_hidden_states=text_embeds, timestep=timestep,
                     image_rotary_emb=rotary, return_dict=False)[0]
    raise ValueError(f"no diffusers call for model arch {arch!r}")


def cogvideox_rotary(config, latents_shape, device):
    """The ``image_rotary_emb`` diffusers' CogVideoX pipeline computes for latents (B, F, C, H, W), or None."""
    if not config.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if config.patch_size_t is not None:
        raise ValueError("CogVideoX 1.5 (patch_size_t) is not supported")
    p = config.patch_size
    rows, cols = latents_shape[3] // p, latents_shape[4] // p
    crops = get_resize_crop_region_for_grid((rows, cols), config.sample_width // p, config.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=(rows, cols),
                                   temporal_size=latents_shape[1], device=device)
