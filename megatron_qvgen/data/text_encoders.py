"""Caption -> (L, D) embedding, the way the model's pipeline feeds its transformer.

- ``HashCaptionEncoder``: built in, no weights. Each word maps to a fixed pseudo-random vector (seeded
  by a hash of the word), so different captions give different embeddings and equal words agree
  across samples: enough for a tiny model to learn text conditioning on the synthetic set.
- ``PretrainedTextEncoder``: a transformers UMT5EncoderModel / T5EncoderModel and its tokenizer from
  local folders (safetensors only). Padding follows diffusers: Wan keeps the encoder output of the real
  tokens and zeros the rest (``padding="zeros"``); CogVideoX feeds the whole padded output
  (``padding="encoder"``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Dict, List, Sequence

import numpy as np

from megatron_qvgen.config.errors import ConfigError

PADDINGS = ("zeros", "encoder")
TEXT_ENCODER_CLASSES = ("UMT5EncoderModel", "T5EncoderModel")


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class HashCaptionEncoder:
    NAME = "builtin-hash-v1"

    def __init__(self, text_len: int, text_dim: int):
        if text_len < 2 or text_dim < 1:
            raise ValueError(f"text_len must be >= 2 and text_dim >= 1, got {text_len}, {text_dim}")
        self.text_len, self.text_dim = text_len, text_dim
        self._vectors: Dict[str, np.ndarray] = {}
        # A small positional signal so word order matters too.
        pos = np.arange(text_len, dtype=np.float64)[:, None]
        freq = np.exp(-np.arange(0, text_dim, 2, dtype=np.float64) / max(text_dim, 2) * np.log(100.0))
        table = np.zeros((text_len, text_dim))
        table[:, 0::2] = np.sin(pos * freq)[:, : (text_dim + 1) // 2]
        table[:, 1::2] = np.cos(pos * freq)[:, : text_dim // 2]
        self._positions = (0.1 * table).astype(np.float32)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.NAME, "padding": "zeros", "max_length": self.text_len}

    def _vector(self, word: str) -> np.ndarray:
        vec = self._vectors.get(word)
        if vec is None:
            seed = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
            vec = (0.5 * np.random.default_rng(seed).standard_normal(self.text_dim)).astype(np.float32)
            self._vectors[word] = vec
        return vec

    def tokens(self, caption: str) -> List[str]:
        return re.findall(r"[a-z0-9]+", caption.lower())[: self.text_len - 1] + ["</s>"]

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(captions), self.text_len, self.text_dim), dtype=np.float32)
        for i, caption in enumerate(captions):
            words = self.tokens(caption)
            out[i, : len(words)] = np.stack([self._vector(w) for w in words]) + self._positions[: len(words)]
        return out


class PretrainedTextEncoder:
    def __init__(self, encoder_dir: str, tokenizer_dir: str, text_len: int, padding: str, device=None,
                 dtype=None):
        import torch
        import transformers

        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        config_path = os.path.join(encoder_dir, "config.json")
        try:
            with open(config_path) as f:
                arch = (json.load(f).get("architectures") or [None])[0]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"text encoder folder {encoder_dir} has no readable config.json: {exc}") from None
        if arch not in TEXT_ENCODER_CLASSES:
            raise ConfigError(f"{config_path}: text encoder class {arch!r} is not one of {TEXT_ENCODER_CLASSES}")
        self.device = torch.device(device or "cpu")
        self.model = getattr(transformers, arch).from_pretrained(
            encoder_dir, use_safetensors=True, dtype=dtype or torch.float32).to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        self.arch, self.text_len, self.padding = arch, text_len, padding
        self.text_dim = int(self.model.config.d_model)
        self._config_digest = file_digest(config_path)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.arch, "config_sha256": self._config_digest, "padding": self.padding,
                "max_length": self.text_len}

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        import torch

        captions = [" ".join(c.split()) for c in captions]
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.text_len, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        with torch.no_grad():
            if self.padding == "zeros":
                hidden = self.model(ids, mask).last_hidden_state.float()
                hidden = hidden * mask.gt(0).unsqueeze(-1).to(hidden.dtype)
            else:
                hidden = self.model(ids).last_hidden_state.float()
        return hidden.cpu().numpy()
