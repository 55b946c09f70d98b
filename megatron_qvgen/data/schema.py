"""The sample schema: ``<key>.latent.npy`` (C,F,H,W float16), ``<key>.text.npy`` (L,D float16), ``<key>.json``.

Decoding never unpickles: .npy is parsed with numpy's header reader and refused if its dtype holds
objects; json goes through ``json.loads``; a member of any other type makes the sample bad without being
decoded. Every check raises :class:`BadSample` with the reason the loader counts.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import numpy as np

from megatron_qvgen.data.errors import BadSample
from megatron_qvgen.data.latent_norm import LatentNorm

if TYPE_CHECKING:
    from megatron_qvgen.data.manifest import DatasetManifest

SCHEMA_VERSION = 1
LATENT, TEXT, META = "latent.npy", "text.npy", "json"
MEMBER_TYPES = (LATENT, TEXT, META)
# Keys become tar member names "<key>.<type>" (ustar: at most 100 bytes, no dots: a dot ends the key).
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} must match {KEY_PATTERN.pattern}")
    return key


# ---------------------------------------------------------------------------------------------- npy
def encode_npy(array: np.ndarray) -> bytes:
    if array.dtype != np.float16:
        raise ValueError(f"stored arrays are float16, got {array.dtype}")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_header(prefix: bytes) -> Tuple[Tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) from the first bytes of a .npy; ValueError if invalid."""
    mv = memoryview(prefix)
    if len(mv) < 10 or bytes(mv[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy (bad magic)")
    major = mv[6]
    if major == 1:
        start, hlen = 10, int.from_bytes(mv[8:10], "little")
    elif major == 2:
        start, hlen = 12, int.from_bytes(mv[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy version {major}")
    if len(mv) < start + hlen:
        raise ValueError("the .npy header is cut short")
    head = io.BytesIO(bytes(mv[:start + hlen]))
    version = np.lib.format.read_magic(head)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(head)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle: refused")
    return tuple(int(s) for s in shape), dtype, bool(fortran), start + hlen


def decode_npy(data, what: str) -> np.ndarray:
    """Parse a .npy member without copying its data (a view on ``data``)."""
    try:
        shape, dtype, fortran, offset = npy_header(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt member
        raise BadSample("corrupt_npy", f"{what}: {exc}") from None
    count = math.prod(shape)
    payload = len(memoryview(data)) - offset
    if payload != count * dtype.itemsize:
        raise BadSample("corrupt_npy", f"{what}: {payload} data bytes for shape {shape} of {dtype}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def has_non_finite(array: np.ndarray) -> bool:
    """float16 NaN/inf have all exponent bits set; testing the bits is ~10x faster than np.isfinite."""
    return bool(np.any((array.view(np.uint16) & 0x7C00) == 0x7C00))


# ---------------------------------------------------------------------------------------------- json
@dataclass(frozen=True)
class SampleMeta:
    caption: str
    frames: int                         # video frames the latent encodes
    size: Tuple[int, int]               # video (height, width) in pixels
    fps: float
    latent_shape: Tuple[int, int, int, int]
    text_shape: Tuple[int, int]
    vae: Dict[str, Any]                 # {"name": ..., ...}: what made the latent
    text_encoder: Dict[str, Any]        # {"name": ..., ...}: what made the text embedding
    latent_norm: Dict[str, Any]         # LatentNorm.to_dict()
    source: str = ""                    # the video file, relative to the input folder
    schema_version: int = SCHEMA_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json_bytes(self) -> bytes:
        d = {
            "schema_version": self.schema_version, "caption": self.caption, "frames": self.frames,
            "size": list(self.size), "fps": self.fps, "latent_shape": list(self.latent_shape),
            "text_shape": list(self.text_shape), "vae": self.vae, "text_encoder": self.text_encoder,
            "latent_norm": self.latent_norm, "source": self.source,
        }
        if self.extra:
            d["extra"] = self.extra
        return json.dumps(d, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json_bytes(cls, data) -> "SampleMeta":
        try:
            d = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadSample("bad_json", f"not UTF-8 JSON: {exc}") from None
        if not isinstance(d, dict):
            raise BadSample("bad_json", "the json member is not an object")
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadSample("bad_json", f"{type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_dict(cls, d: Dict[str, Any]) -> "SampleMeta":
        version = d["schema_version"]
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {version!r}, this reader knows {SCHEMA_VERSION}")
        caption = d["caption"]
        if not isinstance(caption, str):
            raise TypeError("caption must be a string")
        latent_shape = _int_tuple(d["latent_shape"], 4, "latent_shape")
        text_shape = _int_tuple(d["text_shape"], 2, "text_shape")
        size = _int_tuple(d["size"], 2, "size")
        frames, fps = d["frames"], d["fps"]
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive integer, got {frames!r}")
        if not isinstance(fps, (int, float)) or not fps > 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        for name in ("vae", "text_encoder"):
            if not isinstance(d[name], dict) or not isinstance(d[name].get("name"), str):
                raise ValueError(f"{name} must be an object with a 'name'")
        LatentNorm.from_dict(d["latent_norm"])
        return cls(caption=caption, frames=frames, size=size, fps=float(fps), latent_shape=latent_shape,
                   text_shape=text_shape, vae=d["vae"], text_encoder=d["text_encoder"],
                   latent_norm=d["latent_norm"], source=str(d.get("source", "")), schema_version=version,
                   extra=dict(d.get("extra", {})))


def _int_tuple(value, n: int, name: str) -> Tuple[int, ...]:
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{name} must be a list of {n} positive integers, got {value!r}")
    return tuple(value)


# ---------------------------------------------------------------------------------------------- sample
@dataclass
class Sample:
    key: str
    latent: np.ndarray    # (C, F, H, W) float16
    text: np.ndarray      # (L, D) float16
    meta: SampleMeta


def decode_sample(key: str, members: Mapping[str, Any], manifest: "DatasetManifest",
                  expected_latent_shape: Optional[Tuple[int, ...]] = None) -> Sample:
    """Validate and decode one sample's members (``{"latent.npy": bytes, ...}``) against its dataset."""
    unexpected = set(members) - set(MEMBER_TYPES)
    if unexpected:
        raise BadSample("unexpected_member", f"{key}: {sorted(unexpected)}")
    missing = set(MEMBER_TYPES) - set(members)
    if missing:
        raise BadSample("missing_member", f"{key}: {sorted(missing)}")
    meta = SampleMeta.from_json_bytes(members[META])
    mismatch = manifest.meta_mismatch(meta)
    if mismatch:
        raise BadSample("wrong_meta", f"{key}: {mismatch}")
    latent = decode_npy(members[LATENT], f"{key}.{LATENT}")
    text = decode_npy(members[TEXT], f"{key}.{TEXT}")
    for what, array in ((LATENT, latent), (TEXT, text)):
        if array.dtype != np.float16:
            raise BadSample("wrong_dtype", f"{key}.{what} is {array.dtype}, expected float16")
    if latent.shape != meta.latent_shape:
        raise BadSample("wrong_shape", f"{key}.{LATENT} is {latent.shape}, its json says {meta.latent_shape}")
    if expected_latent_shape is not None and latent.shape != tuple(expected_latent_shape):
        raise BadSample("wrong_shape", f"{key}.{LATENT} is {latent.shape}, the shard index says "
                                       f"{tuple(expected_latent_shape)}")
    if latent.shape[0] != manifest.latent_channels:
        raise BadSample("wrong_shape", f"{key}.{LATENT} has {latent.shape[0]} channels, the dataset "
                                       f"{manifest.latent_channels}")
    expected_text = (manifest.text_len, manifest.text_dim)
    if text.shape != expected_text or text.shape != meta.text_shape:
        raise BadSample("wrong_shape", f"{key}.{TEXT} is {text.shape}, the dataset has {expected_text}")
    for what, array in ((LATENT, latent), (TEXT, text)):
        if has_non_finite(array):
            raise BadSample("non_finite", f"{key}.{what} holds NaN or inf")
    return Sample(key=key, latent=latent, text=text, meta=meta)
