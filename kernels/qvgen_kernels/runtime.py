"""Load an export folder into the runtime transformer of its model family (read from config.json's ``_class_name``),
so that a deployment script need not know which model it was handed."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .cogvideox_model import CogVideoXRuntimeTransformer
from .format import CONFIG_FILE, ExportFormatError
from .runtime_parts import RuntimeTransformer
from .wan_model import WanRuntimeTransformer

RUNTIMES = {cls.CLASS_NAME: cls for cls in (WanRuntimeTransformer, CogVideoXRuntimeTransformer)}


def load_transformer(folder: os.PathLike, device: torch.device | str = "cpu",
                     attention: Optional[str] = None) -> RuntimeTransformer:
    """The runtime transformer of an export; ``attention`` ``"int8"`` / ``"bf16"`` for the self-attention (the
    cross-attention to the text stays bf16: ``attention.cross_attention_mode``), None: ``attention.default_mode``
    (int8 on Hopper, bf16 elsewhere)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not an export folder")
    try:
        class_name = json.loads(path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ExportFormatError(f"{path}: not a JSON object ({e})") from e
    if class_name not in RUNTIMES:
        raise ExportFormatError(f"{path}: _class_name {class_name!r} has no runtime; known: {sorted(RUNTIMES)}")
    return RUNTIMES[class_name].from_export(folder, device, attention)
