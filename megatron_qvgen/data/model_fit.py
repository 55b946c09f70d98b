"""Do these shards fit this model? Checked before anything is read, with the flags that would make them fit.

Text-to-video training feeds the latents in and asks for a prediction in the same latent space, so the
model's ``in_channels`` and ``out_channels`` both equal the latents' channels; its text width and length
equal the embeddings'. The field names differ per architecture (``text_dim`` / ``text_embed_dim``,
``text_len`` / ``max_text_seq_length``); the message uses the ones the user can pass.
"""
from __future__ import annotations

from typing import List, Optional

from megatron_qvgen.data.errors import DatasetError
from megatron_qvgen.data.manifest import DatasetManifest

# arch -> the overrides that set the text width and the text length ({} = the value)
_TEXT_FLAGS = {
    "wan": ("--model.text_dim {}", "--model.text_len {}"),
    "cogvideox": ("--model.text_embed_dim {}", "--model.max_text_seq_length {}"),
}
_ANY_ARCH = ("--model.text_dim {0} (Wan) or --model.text_embed_dim {0} (CogVideoX)",
             "--model.text_len {0} (Wan) or --model.max_text_seq_length {0} (CogVideoX)")


def check_dataset_fits_model(manifest: DatasetManifest, where: str, model=None, *,
                             latent_channels: Optional[int] = None, text_len: Optional[int] = None,
                             text_dim: Optional[int] = None) -> None:
    """Raise DatasetError (one line naming ``where`` and the flags to set) unless the data fits.

    ``model``: a WanConfig / CogVideoXConfig (checks in and out channels, text width and length). Without
    it, the sizes given are checked (``latent_channels`` is the model's input channels).
    """
    in_channels = out_channels = None
    text_flags = _ANY_ARCH
    if model is not None:
        in_channels, out_channels, text_len = model.in_channels, model.out_channels, model.text_len
        text_dim = model.text_dim if model.arch == "wan" else model.text_embed_dim
        text_flags = _TEXT_FLAGS[model.arch]
    elif latent_channels is not None:
        in_channels = latent_channels
    c, width_flag, len_flag = manifest.latent_channels, text_flags[0], text_flags[1]
    problems: List[str] = []
    if (in_channels is not None and in_channels != c) or (out_channels is not None and out_channels != c):
        has = f"in_channels={in_channels}" + (f", out_channels={out_channels}" if out_channels is not None else "")
        problems.append(f"the latents have {c} channels, the model {has}: set --model.in_channels {c} "
                        f"--model.out_channels {c} (together: the model predicts in the latent space)")
    if text_dim is not None and text_dim != manifest.text_dim:
        problems.append(f"the text embeddings are {manifest.text_dim} wide, the model takes {text_dim}: set "
                        + width_flag.format(manifest.text_dim))
    if text_len is not None and text_len != manifest.text_len:
        problems.append(f"the text embeddings have {manifest.text_len} tokens, the model takes {text_len}: set "
                        + len_flag.format(manifest.text_len))
    if problems:
        raise DatasetError(f"{where} does not fit the model: " + "; ".join(problems))
