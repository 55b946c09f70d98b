"""megatron dist checkpoints (torch_dist) of whole models: model save/load, and streaming I/O of tensors.

- ``save_model`` / ``load_model``: every rank describes its shards (``sharded_state_dict``) and megatron's
  ``dist_checkpointing`` writes/reads them; a checkpoint saved at one TP/PP loads at any other.
- ``write_streaming``: one process writes a checkpoint tensor by tensor (each read only when written, one
  file per tensor), so a 14B model converts in a few GiB of memory. The result is the same torch_dist
  format (PyTorch DCP files, megatron's metadata.json and common.pt) that ``load_model`` reads at any
  TP/PP: in this format the layout at write time does not matter.
- ``read_tensors`` / ``checkpoint_shapes``: full tensors out of a checkpoint without a process group.
The model config travels in the checkpoint's common part (common.pt), so tools need no extra flags.
Model saves and loads go through ``megatron_qvgen.dist_ckpt`` (atomic, completion marker, clear errors);
the streaming writer produces the same layout, marker included.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_qvgen.config import ConfigError, ModelConfig
from megatron_qvgen.config.model import architecture_differences, model_config_from_dict
from megatron_qvgen.convert.atomic_folder import new_folder
from megatron_qvgen.convert.errors import ConversionError
from megatron_qvgen.dist_ckpt import (COMPLETE_MARKER, CheckpointError, load_common, load_sharded,
                                     save_sharded)

CONTENT_KEY = "qvgen_model"
TensorLoader = Callable[[], torch.Tensor]


# ------------------------------------------------------------------ model config in the checkpoint
def content_metadata(model_cfg: ModelConfig) -> dict:
    """The non-sharded entry a model checkpoint carries so tools can rebuild the model: merge it into
    the state dict that is saved (training checkpoints too)."""
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model_cfg).items()}
    return {CONTENT_KEY: fields}


def read_model_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    check_dist_checkpoint(ckpt_dir)
    try:
        common = load_common(str(ckpt_dir)) or {}
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable common.pt
        raise ConversionError(f"{ckpt_dir}: cannot read common.pt ({exc})") from None
    fields = common.get(CONTENT_KEY)
    if fields is None:
        raise ConversionError(f"{ckpt_dir}: the checkpoint does not record its model config "
                              f"({CONTENT_KEY!r} in common.pt); it was not written by megatron-qvgen")
    fields = dict(fields)
    try:
        return model_config_from_dict(fields.pop("arch"), fields)
    except (ConfigError, TypeError, KeyError) as exc:
        raise ConversionError(f"{ckpt_dir}: invalid model config in the checkpoint: {exc}") from None


def check_dist_checkpoint(ckpt_dir: str | os.PathLike) -> None:
    path = Path(ckpt_dir)
    meta = path / "metadata.json"
    if not path.is_dir():
        raise ConversionError(f"{path}: no such checkpoint folder")
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not a megatron dist checkpoint (metadata.json: {exc})") from None
    if backend != "torch_dist":
        raise ConversionError(f"{path}: sharded_backend is {backend!r}; only 'torch_dist' is supported")


# ------------------------------------------------------------------ streaming write (one process)
def write_streaming(dst: str | os.PathLike, tensors: Sequence[Tuple[str, Tuple[int, ...], torch.dtype, TensorLoader]],
                    model_cfg: ModelConfig, progress: bool = True) -> Path:
    """Write a torch_dist checkpoint of full tensors; each loader runs when its tensor is written."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from tqdm import tqdm

    loaders = {key: loader for key, _, _, loader in tensors}
    if len(loaders) != len(tensors):
        raise ConversionError("duplicate checkpoint keys in the conversion table")
    bar = tqdm(total=sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, s, d, _ in tensors),
               unit="B", unit_scale=True, desc="write megatron checkpoint", disable=not progress)

    class LazyPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            tensor = loaders[write_item.index.fqn]()
            bar.update(tensor.numel() * tensor.element_size())
            return tensor

    placeholders = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape, dtype, _ in tensors}
    dst = Path(dst)
    with new_folder(dst) as tmp:
        # One file per tensor and one writer thread: only the tensor being written is in memory.
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False, thread_count=1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(placeholders, storage_writer=writer, planner=LazyPlanner(), no_dist=True)
        torch.save(content_metadata(model_cfg), tmp / "common.pt")
        save_config(CheckpointingConfig("torch_dist", 1), str(tmp))
        (tmp / COMPLETE_MARKER).write_text("ok\n")
    bar.close()
    return dst


# ------------------------------------------------------------------ reading without a process group
def checkpoint_shapes(ckpt_dir: str | os.PathLike) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """key -> (global shape, dtype) of every tensor in the checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    check_dist_checkpoint(ckpt_dir)
    try:
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a corrupt or missing .metadata file
        raise ConversionError(f"{ckpt_dir}: cannot read the tensor metadata (.metadata): {exc}") from None
    return {key: (tuple(meta.size), meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}


def read_tensors(ckpt_dir: str | os.PathLike, wanted: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
                 ) -> Dict[str, torch.Tensor]:
    """Full tensors of the given keys (shapes/dtypes as from ``checkpoint_shapes``)."""
    import torch.distributed.checkpoint as dcp

    out = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in wanted.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(out, storage_reader=dcp.FileSystemReader(str(ckpt_dir)), no_dist=True)
        except Exception as exc:  # noqa: BLE001 - DCP wraps file errors in its own types
            raise ConversionError(f"{ckpt_dir}: cannot read tensors {list(wanted)[:3]}: {exc}") from None
    return out


def batches_by_bytes(items: Iterable[Tuple[str, Tuple[Tuple[int, ...], torch.dtype]]], max_bytes: int
                     ) -> Iterable[Dict[str, Tuple[Tuple[int, ...], torch.dtype]]]:
    """Group keys into batches of at most ``max_bytes`` (one oversized tensor forms its own batch)."""
    batch, size = {}, 0
    for key, (shape, dtype) in items:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if batch and size + nbytes > max_bytes:
            yield batch
            batch, size = {}, 0
        batch[key] = (shape, dtype)
        size += nbytes
    if batch:
        yield batch


# ------------------------------------------------------------------ model save / load (all ranks)
def _chunks_state(model_chunks: List[torch.nn.Module]) -> dict:
    if len(model_chunks) == 1:
        return model_chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def save_model(model_chunks: List[torch.nn.Module], ckpt_dir: str | os.PathLike, model_cfg: ModelConfig) -> None:
    """Collective: every rank of the job calls it; a new folder ``ckpt_dir`` appears when complete."""
    state = _chunks_state(model_chunks)
    state.update(content_metadata(model_cfg))
    save_sharded(state, str(ckpt_dir))


def load_model(model_chunks: List[torch.nn.Module], ckpt_dir: str | os.PathLike,
               model_cfg: Optional[ModelConfig] = None, *, partial: bool = False) -> None:
    """Collective: load this rank's shards of every chunk from a torch_dist checkpoint (any TP/PP).

    ``partial=True`` loads every tensor the checkpoint has and leaves the model's other tensors as built:
    bf16 weights into a QAT model, whose quantizer state and auxiliary factors they lack.
    """
    check_dist_checkpoint(ckpt_dir)
    if model_cfg is not None:
        differences = architecture_differences(read_model_config(ckpt_dir), model_cfg)
        if differences:
            diffs = ", ".join(f"{k}: checkpoint {theirs!r}, model {ours!r}"
                              for k, (theirs, ours) in differences.items())
            raise ConversionError(f"{ckpt_dir}: checkpoint holds a different model ({diffs})")
    state = _chunks_state(model_chunks)
    if partial:
        state = _only_stored(state, set(checkpoint_shapes(ckpt_dir)))
    with warnings.catch_warnings():  # megatron 0.16 calls DCP's deprecated load_state_dict
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*load_state_dict.*")
        loaded = load_sharded(state, str(ckpt_dir))
    loaded.pop(CONTENT_KEY, None)  # the common part of the checkpoint, not model state
    parts = [loaded] if len(model_chunks) == 1 else [loaded[f"model{i}"] for i in range(len(model_chunks))]
    for chunk, part in zip(model_chunks, parts):
        chunk.load_state_dict(part, strict=not partial)


def _only_stored(state: dict, stored: set) -> dict:
    """The entries of a (nested) sharded state dict whose checkpoint key the checkpoint holds."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for name, value in state.items():
        if isinstance(value, dict):
            out[name] = _only_stored(value, stored)
        elif isinstance(value, ShardedTensor) and value.key in stored:
            out[name] = value
    return out
