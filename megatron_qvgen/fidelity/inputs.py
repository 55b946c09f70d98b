"""The inputs teacher and student share: initial noise and text conditioning, the same for both.

Text (and the latent size, so the noise has the shape of real samples) comes from the run's own latent
shards: the first ``samples`` of a fixed, seed-independent order (the loader with caption dropout off), so
every evaluation of one dataset uses the same prompts. Sample i's noise is drawn from a generator seeded by
(seed, i) alone: the same whatever the batch size or device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List

import torch

EVAL_DATA_SEED_OFFSET = 31_337


@dataclass
class EvalInputs:
    noise: List[torch.Tensor]        # per sample, float32, the model's layout (Wan C,F,H,W; CogVideoX F,C,H,W)
    text: List[torch.Tensor]         # per sample, float32 [L, D]
    empty_text: torch.Tensor         # float32 [L, D]: the unconditional embedding (classifier-free guidance)
    captions: List[str]
    data: List[torch.Tensor]         # per sample, the dataset's own latent (stored layout): what the caption shows
    latent_source: dict              # the dataset manifest's "vae" entry: how latents map back to pixels
    arch: str

    def __len__(self) -> int:
        return len(self.noise)

    def stored_layout(self, latent: torch.Tensor) -> torch.Tensor:
        """A model-layout latent (one sample) in the shards' (C, F, H, W) layout."""
        return latent.transpose(0, 1) if self.arch == "cogvideox" else latent

    def batches(self, batch_size: int):
        """(indices, noise [B, ...], text [B, L, D]) of consecutive samples of one latent shape."""
        i = 0
        while i < len(self):
            j = i + 1
            while j < len(self) and j - i < batch_size and self.noise[j].shape == self.noise[i].shape:
                j += 1
            yield list(range(i, j)), torch.stack(self.noise[i:j]), torch.stack(self.text[i:j])
            i = j


def model_text_dim(model_cfg) -> int:
    return model_cfg.text_dim if model_cfg.arch == "wan" else model_cfg.text_embed_dim


def load_inputs(cfg, samples: int, seed: int) -> EvalInputs:
    """``samples`` prompts of the run's dataset (``cfg.data``) and their initial noise."""
    from megatron_qvgen.config import ConfigError
    from megatron_qvgen.data import DatasetError, build_latent_loader, ensure_synthetic_dataset
    from megatron_qvgen.fidelity.errors import EvaluationError

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    m = cfg.model
    data = dataclasses.replace(cfg.data, num_workers=0, caption_dropout=0.0, resample=False,
                               seed=cfg.data.seed + EVAL_DATA_SEED_OFFSET)
    try:
        ensure_synthetic_dataset(cfg.data, m.in_channels, m.text_len, model_text_dim(m))
        loader = build_latent_loader(data, 1, 0, 1, latent_channels=m.in_channels, text_len=m.text_len,
                                     text_dim=model_text_dim(m))
    except (DatasetError, ConfigError) as exc:
        raise EvaluationError(f"prompts from data.shards={cfg.data.shards}: {exc} (override with --data.shards)") from None
    try:
        noise, text, captions, latents = [], [], [], []
        for i in range(samples):
            batch = next(loader)
            shape = batch.latents.shape[1:]
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            eps = torch.randn(shape, generator=gen, dtype=torch.float32)
            noise.append(eps.transpose(0, 1).contiguous() if m.arch == "cogvideox" else eps)
            text.append(batch.text[0].float())
            captions.append(batch.captions[0])
            latents.append(batch.latents[0].float())
        empty = loader.empty_prompt_embedding.float()
        source = dict(loader.manifest.vae)
    finally:
        loader.close()
    return EvalInputs(noise=noise, text=text, empty_text=empty, captions=captions, data=latents,
                      latent_source=source, arch=m.arch)
