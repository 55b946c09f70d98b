"""Reading and writing diffusers transformer folders, one tensor at a time.

A folder is ``config.json`` plus ``diffusion_pytorch_model.safetensors`` or sharded
``diffusion_pytorch_model-0000k-of-0000N.safetensors`` with ``diffusion_pytorch_model.safetensors.index.json``.
Reads go through ``safetensors.safe_open`` (lazy: only the requested tensor is read); writes fill one
shard at a time, into a temporary folder that is renamed into place when complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_qvgen.config import CogVideoXConfig, ConfigError, WanConfig
from megatron_qvgen.convert.atomic_folder import new_folder
from megatron_qvgen.convert.errors import ConversionError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CLASS_NAMES = {"wan": "WanTransformer3DModel", "cogvideox": "CogVideoXTransformer3DModel"}

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def transformer_dir(path: str | os.PathLike) -> Path:
    """The transformer folder: ``path`` itself, or ``path/transformer`` of a pipeline folder."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    raise ConversionError(f"{path}: no config.json here or in {path / 'transformer'}; "
                          "expected a diffusers transformer (or pipeline) folder")


def read_model_config(folder: Path, arch: str):
    """Our model config from a diffusers config.json; rejects variants we do not implement."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: cannot read the diffusers config: {exc}") from None
    expected = CLASS_NAMES.get(arch)
    if expected is None:
        raise ConversionError(f"--model {arch!r} is not supported; choose from {sorted(CLASS_NAMES)}")
    if raw.get("_class_name") not in (None, expected):
        raise ConversionError(f"{path}: _class_name is {raw.get('_class_name')!r}, expected {expected!r} "
                              f"for --model {arch}")
    return _wan_config(raw, path) if arch == "wan" else _cogvideox_config(raw, path)


def _wan_config(raw: dict, path: Path) -> WanConfig:
    unsupported = {"image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}
    for key, allowed in unsupported.items():
        if raw.get(key, allowed) != allowed:
            raise ConversionError(f"{path}: {key}={raw[key]!r}: only Wan 2.1 text-to-video is supported")
    if raw.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ConversionError(f"{path}: qk_norm={raw['qk_norm']!r}; only 'rms_norm_across_heads' is supported")
    fields = {k: v for k, v in raw.items() if k in WanConfig.__dataclass_fields__ and k != "arch"}
    if fields.get("out_channels") is None:
        fields["out_channels"] = fields.get("in_channels", WanConfig.in_channels)
    try:
        return WanConfig(**fields)
    except (ConfigError, TypeError) as exc:
        raise ConversionError(f"{path}: invalid Wan config: {exc}") from None


# diffusers CogVideoX options we do not implement, with the value we implement (CogVideoX 1.0 text-to-video).
_COGVIDEOX_FIXED = {"patch_size_t": None, "ofs_embed_dim": None, "use_learned_positional_embeddings": False,
                    "activation_fn": "gelu-approximate", "timestep_activation_fn": "silu",
                    "norm_elementwise_affine": True, "dropout": 0.0}


def _cogvideox_config(raw: dict, path: Path) -> CogVideoXConfig:
    for key, allowed in _COGVIDEOX_FIXED.items():
        if raw.get(key, allowed) != allowed:
            raise ConversionError(f"{path}: {key}={raw[key]!r}: only CogVideoX 1.0 text-to-video ({key}={allowed!r}) "
                                  "is supported")
    fields = {k: v for k, v in raw.items() if k in CogVideoXConfig.__dataclass_fields__ and k != "arch"}
    if fields.get("out_channels") is None:
        fields["out_channels"] = fields.get("in_channels", CogVideoXConfig.in_channels)
    try:
        return CogVideoXConfig(**fields)
    except (ConfigError, TypeError) as exc:
        raise ConversionError(f"{path}: invalid CogVideoX config: {exc}") from None


def diffusers_class(arch: str):
    """diffusers' transformer class of an arch."""
    import diffusers

    if arch not in CLASS_NAMES:
        raise ConversionError(f"model arch {arch!r} has no diffusers class; choose from {sorted(CLASS_NAMES)}")
    return getattr(diffusers, CLASS_NAMES[arch])


def load_diffusers_model(folder: Path, arch: str, dtype: torch.dtype = torch.float32):
    """diffusers' model from a folder without ``from_pretrained`` (which needs ``accelerate``): built from
    the config, then every tensor loaded strictly."""
    model_cfg = read_model_config(folder, arch)
    model = diffusers_class(arch)(**model_cfg.diffusers_kwargs())
    source = SafetensorsSource(folder)
    state = {key: source.get(key) for key in source.shapes()}
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def diffusers_config_dict(model_cfg) -> dict:
    """config.json content that ``WanTransformer3DModel`` / ``CogVideoXTransformer3DModel.from_pretrained`` reads."""
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:
        version = "0.35.0"
    config = {"_class_name": CLASS_NAMES[model_cfg.arch], "_diffusers_version": version}
    config.update(model_cfg.diffusers_kwargs())
    if model_cfg.arch == "wan":
        config["patch_size"] = list(config["patch_size"])
        config.update(image_dim=None, added_kv_proj_dim=None, pos_embed_seq_len=None)
    else:
        config.update(_COGVIDEOX_FIXED)
    return config


class SafetensorsSource:
    """Lazy access to the tensors of a diffusers folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index, single = folder / INDEX_NAME, folder / WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index}: not a safetensors index ({exc})") from None
            self._files: Dict[str, Path] = {key: folder / name for key, name in weight_map.items()}
        elif single.is_file():
            self._files = {key: single for key in self._header(single)}
        else:
            raise ConversionError(f"{folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found "
                                  "(only safetensors weights are read)")
        self._meta: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for path in sorted(set(self._files.values())):
            for key, meta in self._header(path).items():
                if self._files.get(key) == path:
                    self._meta[key] = meta
        missing = sorted(set(self._files) - set(self._meta))
        if missing:
            raise ConversionError(f"{folder}: the index lists {missing[:3]} but their files do not hold them")

    @staticmethod
    def _header(path: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """key -> (shape, dtype) from a file's header, without reading tensor data."""
        if not path.is_file():
            raise ConversionError(f"{path}: weight file listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                out = {}
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ConversionError(f"{path}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                    out[key] = (tuple(sl.get_shape()), dtype)
                return out
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {key: shape for key, (shape, _) in self._meta.items()}

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read through a fresh handle: no file stays memory-mapped between tensors, so the
        resident memory of a conversion is one tensor, not the checkpoint."""
        path = self._files[key]
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"{path}: cannot read tensor {key} ({exc})") from None


def write_diffusers_folder(dst: str | os.PathLike, config: dict, tensors: Iterable[Tuple[str, torch.Tensor]],
                           max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json and safetensors shards to a new folder ``dst``, atomically.

    ``tensors`` is consumed lazily; at most one shard is held in memory.
    """
    with new_folder(dst) as tmp:
        _write_shards(tmp, config, tensors, max_shard_bytes)
    return Path(dst)


def _write_shards(tmp: Path, config: dict, tensors: Iterable[Tuple[str, torch.Tensor]],
                  max_shard_bytes: int) -> None:
    shard_files, weight_map, total = [], {}, 0
    shard: Dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(shard_files):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shard_files.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for key, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[key] = tensor.contiguous()
        shard_bytes += size
        total += size
    flush()
    count = len(shard_files)
    for k, (name, keys) in enumerate(shard_files):
        final = WEIGHTS_NAME if count == 1 else f"diffusion_pytorch_model-{k + 1:05d}-of-{count:05d}.safetensors"
        os.replace(tmp / name, tmp / final)
        weight_map.update({key: final for key in keys})
    if count > 1:
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
