"""The inference export: the folder a QAT checkpoint at rank 0 becomes, and its writer and loader.

A folder holds three files, written atomically (temporary name, then ``os.replace``) and in this order,
so that the last one, ``quantization_config.json``, marks a complete export:

``model.safetensors``
    For each quantized linear ``<name>`` (its diffusers module name):

    ======================== ======== =========================== ==========================================
    tensor                   dtype    shape                       meaning
    ======================== ======== =========================== ==========================================
    ``<name>.weight_codes``  uint8    [out, ceil(in / 2)]         two codes a byte along ``in``, even index
                                                                  in the low nibble (``codes.pack_codes``);
                                                                  3-bit codes use the same container
    ``<name>.weight_scale``  float32  [out]                       LSQ+ per-output-channel scale ``s``
    ``<name>.weight_zero``   float32  [out]                       LSQ+ float zero point ``z`` (not rounded)
    ``<name>.act_clip_lower`` float32 [num_timestep_groups]       sigmoid of the learned lower clip logits
    ``<name>.act_clip_upper`` float32 [num_timestep_groups]       sigmoid of the learned upper clip logits
    ``<name>.bias``          bfloat16 [out]                       optional
    ``<name>.aux_left``      bfloat16 [out, r]                    optional low-rank side branch (gamma folded
    ``<name>.aux_right``     bfloat16 [r, in]                     in): y += Qa(x) @ right.T @ left.T
    ======================== ======== =========================== ==========================================

    Every other tensor keeps its diffusers name; floating-point ones are stored in bfloat16.
``config.json``
    The diffusers transformer config, as the model's ``config`` dict.
``quantization_config.json``
    ``format``, ``format_version``, ``weight_bits``, ``act_bits``, ``act_clip_ratio``,
    ``num_timestep_groups``, ``quantized_modules`` (names) and ``module_shapes`` (name -> [out, in]).

The weight codes are ``codes.weight_codes(w, s, z, bits)``; the runtime dequantizes ``s * (q - z)`` and
quantizes activations with ``codes.act_*`` and the clip factors above, so an export computes what the
fake-quantized model computed.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import codes

FORMAT_NAME = "qvgen-inference"
FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
QUANT_CONFIG_FILE = "quantization_config.json"
EXPORT_FILES = (TENSORS_FILE, CONFIG_FILE, QUANT_CONFIG_FILE)

_REQUIRED_SUFFIXES = ("weight_codes", "weight_scale", "weight_zero", "act_clip_lower", "act_clip_upper")
_OPTIONAL_SUFFIXES = ("bias", "aux_left", "aux_right")
QUANTIZED_SUFFIXES = _REQUIRED_SUFFIXES + _OPTIONAL_SUFFIXES


class ExportFormatError(ValueError):
    """An export folder (or what is about to be written to one) is missing, corrupt or inconsistent."""


# ---------------------------------------------------------------------------- quantization config
@dataclass(frozen=True)
class QuantizationConfig:
    weight_bits: int
    act_bits: int
    act_clip_ratio: float
    num_timestep_groups: int
    # name -> (out_features, in_features), in the order the modules were given
    module_shapes: Mapping[str, Tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.weight_bits, int) or not codes.MIN_BITS <= self.weight_bits <= 4:
            raise ExportFormatError(f"weight_bits must be an integer in [{codes.MIN_BITS}, 4] (two codes a byte), "
                                    f"got {self.weight_bits!r}")
        if not isinstance(self.act_bits, int) or not codes.MIN_BITS <= self.act_bits <= codes.MAX_BITS:
            raise ExportFormatError(f"act_bits must be an integer in [{codes.MIN_BITS}, {codes.MAX_BITS}], "
                                    f"got {self.act_bits!r}")
        if not 0.0 < float(self.act_clip_ratio) <= 1.0:
            raise ExportFormatError(f"act_clip_ratio must be in (0, 1], got {self.act_clip_ratio!r}")
        if not isinstance(self.num_timestep_groups, int) or self.num_timestep_groups < 1:
            raise ExportFormatError(f"num_timestep_groups must be an integer >= 1, got {self.num_timestep_groups!r}")
        shapes = {}
        for name, shape in dict(self.module_shapes).items():
            if not isinstance(name, str) or not name or len(shape) != 2 or min(int(s) for s in shape) < 1:
                raise ExportFormatError(f"module_shapes[{name!r}] must be [out_features, in_features], got {shape!r}")
            shapes[name] = (int(shape[0]), int(shape[1]))
        object.__setattr__(self, "module_shapes", shapes)
        object.__setattr__(self, "act_clip_ratio", float(self.act_clip_ratio))

    @property
    def quantized_modules(self) -> Tuple[str, ...]:
        return tuple(self.module_shapes)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "act_clip_ratio": self.act_clip_ratio,
            "num_timestep_groups": self.num_timestep_groups,
            "quantized_modules": list(self.module_shapes),
            "module_shapes": {name: list(shape) for name, shape in self.module_shapes.items()},
        }

    @classmethod
    def from_json(cls, data: dict, where: str = QUANT_CONFIG_FILE) -> "QuantizationConfig":
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ExportFormatError(f"{where}: not a {FORMAT_NAME} quantization config (format = "
                                    f"{data.get('format') if isinstance(data, dict) else None!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ExportFormatError(f"{where}: format_version {data.get('format_version')!r} is not supported "
                                    f"(this runtime reads version {FORMAT_VERSION})")
        missing = [k for k in ("weight_bits", "act_bits", "act_clip_ratio", "num_timestep_groups",
                               "quantized_modules", "module_shapes") if k not in data]
        if missing:
            raise ExportFormatError(f"{where}: missing field(s) {missing}")
        names, shapes = data["quantized_modules"], data["module_shapes"]
        if not isinstance(shapes, dict) or list(names) != list(shapes):
            raise ExportFormatError(f"{where}: quantized_modules and module_shapes must list the same modules "
                                    f"in the same order")
        return cls(weight_bits=data["weight_bits"], act_bits=data["act_bits"],
                   act_clip_ratio=data["act_clip_ratio"], num_timestep_groups=data["num_timestep_groups"],
                   module_shapes={n: tuple(shapes[n]) for n in names})


# ---------------------------------------------------------------------------- one quantized linear
@dataclass
class QuantizedLinearExport:
    """The stored tensors of one quantized linear (shapes and dtypes as in the module docstring)."""
    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor
    act_clip_lower: torch.Tensor
    act_clip_upper: torch.Tensor
    in_features: int
    bias: Optional[torch.Tensor] = None
    aux_left: Optional[torch.Tensor] = None
    aux_right: Optional[torch.Tensor] = None

    @classmethod
    def from_codes(cls, weight_codes: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor,
                   act_clip_lower: torch.Tensor, act_clip_upper: torch.Tensor, weight_bits: int,
                   bias: Optional[torch.Tensor] = None, aux_left: Optional[torch.Tensor] = None,
                   aux_right: Optional[torch.Tensor] = None) -> "QuantizedLinearExport":
        """From integer codes [out, in] (any dtype, e.g. ``codes.weight_codes``'s float32), packed here."""
        if weight_codes.dim() != 2:
            raise ExportFormatError(f"weight codes must be [out, in], got shape {tuple(weight_codes.shape)}")
        c = weight_codes.detach().cpu()
        if c.is_floating_point() and not torch.equal(c, torch.round(c)):
            raise ExportFormatError("weight codes must be integers (round them with codes.weight_codes)")
        if c.numel() and (c.min() < 0 or c.max() > codes.qmax(weight_bits)):
            raise ExportFormatError(f"weight codes must be in [0, {codes.qmax(weight_bits)}] for {weight_bits} bits, "
                                    f"got [{c.min().item()}, {c.max().item()}]")
        out_f = c.shape[0]
        as_row = lambda t: t.detach().cpu().float().reshape(-1)  # noqa: E731
        bf16 = lambda t: None if t is None else t.detach().cpu().to(torch.bfloat16).contiguous()  # noqa: E731
        return cls(weight_codes=codes.pack_codes(c, weight_bits).contiguous(),
                   weight_scale=as_row(weight_scale).reshape(out_f), weight_zero=as_row(weight_zero).reshape(out_f),
                   act_clip_lower=as_row(act_clip_lower), act_clip_upper=as_row(act_clip_upper),
                   in_features=c.shape[1], bias=None if bias is None else bf16(bias).reshape(out_f),
                   aux_left=bf16(aux_left), aux_right=bf16(aux_right))

    @property
    def out_features(self) -> int:
        return self.weight_codes.shape[0]

    def tensors(self, name: str) -> Dict[str, torch.Tensor]:
        out = {f"{name}.{s}": getattr(self, s) for s in QUANTIZED_SUFFIXES if getattr(self, s) is not None}
        return {k: v.contiguous() for k, v in out.items()}

    def validate(self, name: str, config: QuantizationConfig, check_codes: bool = True) -> None:
        """Raise ExportFormatError naming ``name`` and the tensor at the first inconsistency."""
        out_f, in_f = self.out_features, self.in_features
        expect = {
            "weight_codes": (torch.uint8, (out_f, (in_f + 1) // 2)),
            "weight_scale": (torch.float32, (out_f,)),
            "weight_zero": (torch.float32, (out_f,)),
            "act_clip_lower": (torch.float32, (config.num_timestep_groups,)),
            "act_clip_upper": (torch.float32, (config.num_timestep_groups,)),
            "bias": (torch.bfloat16, (out_f,)),
        }
        if (self.aux_left is None) != (self.aux_right is None):
            raise ExportFormatError(f"{name}: aux_left and aux_right must be present together")
        if self.aux_left is not None:
            rank = self.aux_left.shape[-1]
            expect["aux_left"] = (torch.bfloat16, (out_f, rank))
            expect["aux_right"] = (torch.bfloat16, (rank, in_f))
        for suffix, (dtype, shape) in expect.items():
            t = getattr(self, suffix)
            if t is None:
                continue
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ExportFormatError(f"{name}.{suffix}: expected {dtype} {list(shape)}, "
                                        f"got {t.dtype} {list(t.shape)}")
        if not bool(torch.isfinite(self.weight_scale).all() and (self.weight_scale > 0).all()):
            raise ExportFormatError(f"{name}.weight_scale: scales must be finite and positive")
        if not bool(torch.isfinite(self.weight_zero).all()):
            raise ExportFormatError(f"{name}.weight_zero: zero points must be finite")
        for suffix in ("act_clip_lower", "act_clip_upper"):
            t = getattr(self, suffix)
            if not bool(((t > 0) & (t <= 1)).all()):
                raise ExportFormatError(f"{name}.{suffix}: clip factors are sigmoids and must lie in (0, 1]")
        if check_codes and config.weight_bits < 4:
            top = codes.qmax(config.weight_bits)
            if bool(((self.weight_codes & 0x0F) > top).any() or ((self.weight_codes >> 4) > top).any()):
                raise ExportFormatError(f"{name}.weight_codes: codes above {top} in a {config.weight_bits}-bit export")


@dataclass
class InferenceExport:
    """A loaded export folder."""
    transformer_config: dict
    quant_config: QuantizationConfig
    linears: Dict[str, QuantizedLinearExport]
    tensors: Dict[str, torch.Tensor]     # everything not quantized, by diffusers name


# ---------------------------------------------------------------------------- writer
def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only swap it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_per_umask(path: os.PathLike) -> None:
    """Give a file (or folder) the mode a plain ``open`` (``mkdir``) would have: writers such as safetensors and
    tempfile create theirs private (0600 / 0700), which a rename would carry over to the user's output."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~current_umask())


def _atomic_write(path: Path, write) -> None:
    tmp = str(path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        chmod_per_umask(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)   # our own temporary file, never the user's
        raise


def _write_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
    _atomic_write(path, write)


def existing_export_files(dst: os.PathLike) -> Tuple[str, ...]:
    """The export files already in ``dst`` (what writing there would replace)."""
    return tuple(f for f in EXPORT_FILES if (Path(dst) / f).exists())


def write_export(dst: os.PathLike, transformer_config: dict, quant_config: QuantizationConfig,
                 linears: Mapping[str, QuantizedLinearExport], tensors: Mapping[str, torch.Tensor],
                 overwrite: bool = False) -> Path:
    """Write an export folder. ``quant_config.module_shapes`` is filled from ``linears`` (its own is ignored).

    Refuses to replace an existing export unless ``overwrite``; files of other names in ``dst`` are left alone.
    """
    dst = Path(dst)
    if not overwrite:
        existing = existing_export_files(dst)
        if existing:
            raise FileExistsError(f"{dst} already holds an export ({', '.join(existing)}); pass overwrite=True "
                                  "to replace it")
    config = QuantizationConfig(weight_bits=quant_config.weight_bits, act_bits=quant_config.act_bits,
                                act_clip_ratio=quant_config.act_clip_ratio,
                                num_timestep_groups=quant_config.num_timestep_groups,
                                module_shapes={n: (l.out_features, l.in_features) for n, l in linears.items()})
    flat: Dict[str, torch.Tensor] = {}
    for name, linear in linears.items():
        linear.validate(name, config)
        flat.update(linear.tensors(name))
    for name, t in tensors.items():
        if name in flat or any(name.startswith(q + ".") for q in linears):
            raise ExportFormatError(f"tensor {name!r} collides with quantized module tensors")
        t = t.detach().cpu()
        flat[name] = (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
    if not isinstance(transformer_config, dict):
        raise ExportFormatError(f"transformer_config must be a dict, got {type(transformer_config).__name__}")
    dst.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "qvgen_format": FORMAT_NAME, "qvgen_format_version": str(FORMAT_VERSION)}
    _atomic_write(dst / TENSORS_FILE, lambda tmp: save_file(flat, tmp, metadata=metadata))
    _write_json(dst / CONFIG_FILE, dict(transformer_config))
    _write_json(dst / QUANT_CONFIG_FILE, config.to_json())
    return dst


# ---------------------------------------------------------------------------- loader
def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ExportFormatError(f"{path}: not valid JSON ({e})") from e


def load_export(src: os.PathLike, device: torch.device | str = "cpu", check_codes: bool = True) -> InferenceExport:
    """Load and validate an export folder; every inconsistency raises ExportFormatError naming it."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"export folder {src} does not exist")
    missing = [f for f in EXPORT_FILES if not (src / f).is_file()]
    if missing:
        raise ExportFormatError(f"{src} is not a complete export: missing {', '.join(missing)}")
    quant_config = QuantizationConfig.from_json(_read_json(src / QUANT_CONFIG_FILE), str(src / QUANT_CONFIG_FILE))
    transformer_config = _read_json(src / CONFIG_FILE)
    if not isinstance(transformer_config, dict):
        raise ExportFormatError(f"{src / CONFIG_FILE}: expected a JSON object")
    try:
        flat = load_file(str(src / TENSORS_FILE), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportFormatError(f"{src / TENSORS_FILE}: cannot read safetensors ({e})") from e

    linears: Dict[str, QuantizedLinearExport] = {}
    for name, (out_f, in_f) in quant_config.module_shapes.items():
        absent = [s for s in _REQUIRED_SUFFIXES if f"{name}.{s}" not in flat]
        if absent:
            raise ExportFormatError(f"quantized module {name!r}: tensor(s) {absent} missing from {TENSORS_FILE}")
        parts = {s: flat.pop(f"{name}.{s}", None) for s in QUANTIZED_SUFFIXES}
        linear = QuantizedLinearExport(in_features=in_f, **parts)
        if linear.out_features != out_f:
            raise ExportFormatError(f"{name}.weight_codes: {linear.out_features} rows, but module_shapes says "
                                    f"out_features = {out_f}")
        linear.validate(name, quant_config, check_codes=check_codes)
        linears[name] = linear
    strays = sorted(k for k in flat if k.rsplit(".", 1)[-1] in _REQUIRED_SUFFIXES)
    if strays:
        raise ExportFormatError(f"{TENSORS_FILE} holds quantized tensors of modules not listed in "
                                f"{QUANT_CONFIG_FILE}: {strays[:5]}")
    return InferenceExport(transformer_config=transformer_config, quant_config=quant_config,
                           linears=linears, tensors=flat)
