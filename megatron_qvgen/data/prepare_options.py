"""What a data-preparation run is asked for, and the settings fingerprint that ``dataset.json`` keeps.

Every setting that shapes a sample (clip frames, size and rate, text length and padding, the VAE, text
encoder and tokenizer files, the dtypes and tiling they run with) and the shard layout are recorded, so a
rerun into the same folder with other settings is refused naming the fields instead of mixing two kinds of
samples. Model folders are fingerprinted by their files (size plus the first and last MiB of each: tells
checkpoints apart without reading gigabytes), not by their paths, so a moved folder is still the same model.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from megatron_qvgen.config.errors import ConfigError

# What each model family's pipeline feeds its transformer (diffusers conventions).
FAMILIES = {
    "wan": {"frames": 81, "height": 480, "width": 832, "fps": 16.0, "text_len": 512, "padding": "zeros",
            "vae": "AutoencoderKLWan"},
    "cogvideox": {"frames": 49, "height": 480, "width": 720, "fps": 8.0, "text_len": 226, "padding": "encoder",
                  "vae": "AutoencoderKLCogVideoX"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAMPLED_BYTES = 1 << 20
# Which files of a model folder make the model (weights and configs; not READMEs or licences).
_MODEL_SUFFIXES = (".json", ".safetensors")


@dataclass
class PrepareOptions:
    videos_dir: str
    out_dir: str
    vae_dir: str
    text_encoder_dir: str
    tokenizer_dir: str
    family: str = "wan"
    captions: Optional[str] = None          # CSV / TSV / JSONL table; None = a .txt beside each video
    frames: Optional[int] = None            # None = the family's default
    height: Optional[int] = None
    width: Optional[int] = None
    fps: Optional[float] = None             # 0 = consecutive frames at the source rate
    text_len: Optional[int] = None
    samples_per_shard: int = 64
    rank: int = 0
    world: int = 1
    device: Optional[str] = None            # None = cuda:LOCAL_RANK when present, else cpu
    vae_dtype: str = "float32"
    text_dtype: Optional[str] = None        # None = bfloat16 on GPU, float32 on CPU
    vae_tiling: bool = False
    shard_prefix: str = "shard"
    progress: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"--family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        defaults = FAMILIES[self.family]
        for name in ("frames", "height", "width", "fps", "text_len"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        for name in ("frames", "height", "width", "text_len", "samples_per_shard", "world"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)!r}")
        self.fps = float(self.fps)
        if self.fps < 0:
            raise ConfigError(f"--fps must be >= 0, got {self.fps}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise ConfigError(f"--rank {self.rank} is outside [0, --world {self.world})")
        for name in ("vae_dtype", "text_dtype"):
            if getattr(self, name) is not None and getattr(self, name) not in DTYPES:
                raise ConfigError(f"--{_flag(name)} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if not self.shard_prefix.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"--shard-prefix must be letters, digits, _ or -, got {self.shard_prefix!r}")

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.out_dir, f"{self.shard_prefix}-{shard:06d}.tar")

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"

    def resolved_text_dtype(self) -> str:
        on_gpu = torch.device(self.resolved_device()).type == "cuda"
        return self.text_dtype or ("bfloat16" if on_gpu else "float32")

    def settings(self) -> Dict[str, Any]:
        """Every setting that shapes a sample or the shard layout (JSON-able; reads the model folders' files)."""
        return {
            "family": self.family, "frames": self.frames, "height": self.height, "width": self.width,
            "fps": self.fps, "text_len": self.text_len, "text_padding": FAMILIES[self.family]["padding"],
            "vae_files": folder_fingerprint(self.vae_dir, "--vae", _MODEL_SUFFIXES),
            "vae_dtype": self.vae_dtype, "vae_tiling": self.vae_tiling,
            "text_encoder_files": folder_fingerprint(self.text_encoder_dir, "--text-encoder", _MODEL_SUFFIXES),
            "tokenizer_files": folder_fingerprint(self.tokenizer_dir, "--tokenizer"),
            "text_dtype": self.resolved_text_dtype(),
            "samples_per_shard": self.samples_per_shard, "shard_prefix": self.shard_prefix,
        }


def _flag(name: str) -> str:
    return name.replace("_", "-")


def folder_fingerprint(folder: str, flag: str, suffixes: Optional[tuple] = None) -> str:
    """A digest of the files directly in ``folder`` (names, sizes, first and last MiB of each)."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} folder {folder} does not exist")
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))
                   and (suffixes is None or n.endswith(suffixes)))
    if not names:
        raise ConfigError(f"{flag} folder {folder} holds no model files")
    for name in names:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(_SAMPLED_BYTES))
            if size > _SAMPLED_BYTES:
                f.seek(max(_SAMPLED_BYTES, size - _SAMPLED_BYTES))
                h.update(f.read())
    return h.hexdigest()[:16]


def settings_changes(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``name (old -> new)`` for each setting that differs; file digests are shown as 'other files'."""
    changes = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name, "unrecorded"), current.get(name, "unrecorded")
        if old != new:
            changes.append(f"{name} (other files)" if name.endswith("_files") else f"{name} {old} -> {new}")
    return changes
