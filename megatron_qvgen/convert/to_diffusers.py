"""megatron dist checkpoint -> diffusers transformer folder (``from_pretrained`` loads it), streamed.

Tensors are read in batches of bounded size and written into safetensors shards one shard at a time.
Keys the table does not know (e.g. QAT quantizer state of a training checkpoint) are left out and
counted; missing or mis-shaped parameters are errors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List

from tqdm import tqdm

from megatron_qvgen.convert.diffusers_io import diffusers_config_dict, write_diffusers_folder
from megatron_qvgen.convert.checkpoint_io import batches_by_bytes, checkpoint_shapes, read_model_config, read_tensors
from megatron_qvgen.convert.tables import table_for


@dataclass
class ExportSummary:
    destination: Path
    tensors: int
    skipped_keys: List[str]


def megatron_to_diffusers(src: str | os.PathLike, dst: str | os.PathLike, *, key_prefix: str = "",
                          max_shard_bytes: int = 5 * 2**30, read_batch_bytes: int = 2**30,
                          progress: bool = True) -> ExportSummary:
    """``key_prefix``: prefix of the model's keys in the checkpoint (empty for checkpoints written by
    the converter or ``save_model``)."""
    model_cfg = read_model_config(src)
    table = table_for(model_cfg.arch)
    stored = checkpoint_shapes(src)
    found = {key[len(key_prefix):]: meta for key, meta in stored.items() if key.startswith(key_prefix)}
    skipped = table.check_keys(model_cfg, {k: shape for k, (shape, _) in found.items()}, side="megatron",
                               where=str(src), allow_unexpected=True)
    entries = table.entries(model_cfg)
    wanted = [(key_prefix + e.megatron, found[e.megatron]) for e in entries]
    to_diffusers = {key_prefix + e.megatron: e.diffusers for e in entries}

    def tensors():
        with tqdm(total=len(wanted), desc="write diffusers folder", unit="tensor", disable=not progress) as bar:
            for batch in batches_by_bytes(wanted, read_batch_bytes):
                for key, tensor in read_tensors(src, batch).items():
                    yield to_diffusers[key], tensor
                    bar.update(1)

    written = write_diffusers_folder(dst, diffusers_config_dict(model_cfg), tensors(), max_shard_bytes)
    return ExportSummary(written, len(entries), skipped)
