#!/usr/bin/env python
"""Carry a fitted teacher off (and back onto) a machine that returns only a few small files.

The lent GPU sends back at most 8 files of 16 MiB (64 MiB in all) and takes at most 64 MiB with the working tree,
while the small_wan teacher is 72 MB in bf16: without this, a study that outlives one warm machine has to fit its
teacher again (about 9 minutes of the 30 a session gets). Packed, the diffusers folder of the teacher (what
tools/convert/megatron_to_diffusers.py writes) shrinks to about 70 %: the byte holding sign and exponent of every
weight is lzma-compressed (trained weights use few exponents), the mantissa bytes are stored as they are. A
sha256 of the original tensor bytes is checked on unpacking, so a teacher either comes back exact or not at all.

    python benchmarks/fidelity/teacher_pack.py pack --src DIFFUSERS_DIR --out PACK_DIR [--chunk-mib 15] [--max-mib 60]
    python benchmarks/fidelity/teacher_pack.py unpack --src PACK_DIR --out DIFFUSERS_DIR
    python tools/convert/diffusers_to_megatron.py --src DIFFUSERS_DIR --dst TEACHER   # a megatron teacher again

Only safetensors are read; nothing is unpickled.
"""
import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

INDEX = "teacher_pack.json"
FORMAT = 1


def _load_tensors(src: Path):
    """Name -> (dtype name, numpy array) of every tensor of the folder, in a fixed order; bf16 (which numpy
    lacks) as its raw 2-byte words."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            if name in out:
                raise ValueError(f"tensor {name!r} is in two files of {src}")
            if t.dtype == torch.bfloat16:
                out[name] = ("bfloat16", t.view(torch.int16).numpy())
            else:
                out[name] = (str(t.numpy().dtype), t.numpy())
    if not out:
        raise FileNotFoundError(f"no .safetensors file in {src}")
    return dict(sorted(out.items()))


def pack(src: Path, out: Path, chunk_mib: float = 15.0, max_mib: float = 60.0) -> dict:
    tensors = _load_tensors(src)
    itemsizes = {a.dtype.itemsize for _, a in tensors.values()}
    if len(itemsizes) != 1:
        raise ValueError(f"{src} mixes element sizes {sorted(itemsizes)}: convert it to one dtype first")
    size = itemsizes.pop()
    raw = b"".join(np.ascontiguousarray(a).tobytes() for _, a in tensors.values())
    words = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)        # little-endian: the last byte is the top
    planes = [lzma.compress(words[:, -1].tobytes(), preset=1)] + [words[:, i].tobytes() for i in range(size - 1)]
    blob = b"".join(planes)
    if len(blob) > max_mib * 2**20:
        raise ValueError(f"the packed teacher would take {len(blob) / 2**20:.1f} MiB, over --max-mib {max_mib}")
    index = {"format": FORMAT, "itemsize": size, "sha256": hashlib.sha256(raw).hexdigest(),
             "plane_bytes": [len(p) for p in planes], "config": (src / "config.json").read_text(),
             "tensors": [{"name": n, "dtype": d, "shape": list(a.shape)} for n, (d, a) in tensors.items()],
             "chunks": []}
    out.mkdir(parents=True, exist_ok=True)
    step = int(chunk_mib * 2**20)
    for i, start in enumerate(range(0, len(blob), step)):
        name = f"teacher_pack.{i:03d}"
        _write_atomic(out / name, blob[start:start + step])
        index["chunks"].append(name)
    _write_atomic(out / INDEX, json.dumps(index).encode())
    return {"tensors": len(tensors), "raw_mib": len(raw) / 2**20, "packed_mib": len(blob) / 2**20,
            "chunks": len(index["chunks"])}


def unpack(src: Path, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    if out.exists():
        raise FileExistsError(f"{out} exists: unpack writes a new folder")
    index_path = src / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} is missing: not a packed teacher")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, this tool reads {FORMAT}")
    missing = [c for c in index["chunks"] if not (src / c).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)} of the packed teacher")
    blob = b"".join((src / c).read_bytes() for c in index["chunks"])
    if len(blob) != sum(index["plane_bytes"]):
        raise ValueError(f"{src}: the chunks hold {len(blob)} bytes, the index says {sum(index['plane_bytes'])}")
    size, bounds = index["itemsize"], np.cumsum([0] + index["plane_bytes"])
    planes = [blob[bounds[i]:bounds[i + 1]] for i in range(size)]
    top = np.frombuffer(lzma.decompress(planes[0]), dtype=np.uint8)
    words = np.empty((top.size, size), dtype=np.uint8)
    words[:, -1] = top
    for i in range(size - 1):
        words[:, i] = np.frombuffer(planes[i + 1], dtype=np.uint8)
    raw = words.tobytes()
    if hashlib.sha256(raw).hexdigest() != index["sha256"]:
        raise ValueError(f"{src}: the unpacked bytes do not match the packed teacher's sha256 (a damaged chunk)")
    tensors, offset = {}, 0
    for t in index["tensors"]:
        count = int(np.prod(t["shape"], dtype=np.int64))
        if t["dtype"] == "bfloat16":
            a = np.frombuffer(raw, dtype=np.int16, count=count, offset=offset)
            tensors[t["name"]] = torch.from_numpy(a.copy()).view(torch.bfloat16).reshape(t["shape"])
        else:
            a = np.frombuffer(raw, dtype=np.dtype(t["dtype"]), count=count, offset=offset)
            tensors[t["name"]] = torch.from_numpy(a.copy()).reshape(t["shape"])
        offset += count * size
    out.parent.mkdir(parents=True, exist_ok=True)   # the temporary folder beside it: a rename, never a copy
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "diffusion_pytorch_model.safetensors"))
        (tmp / "config.json").write_text(index["config"])
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": len(tensors), "mib": len(raw) / 2**20}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("pack", help="diffusers folder -> packed chunks")
    a.add_argument("--src", required=True, type=Path)
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--chunk-mib", type=float, default=15.0)
    a.add_argument("--max-mib", type=float, default=60.0, help="refuse (write nothing) above this packed size")
    b = sub.add_parser("unpack", help="packed chunks -> a new diffusers folder")
    b.add_argument("--src", required=True, type=Path)
    b.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    try:
        if args.verb == "pack":
            r = pack(args.src, args.out, args.chunk_mib, args.max_mib)
            print(f"packed {r['tensors']} tensors, {r['raw_mib']:.1f} MiB -> {r['packed_mib']:.1f} MiB "
                  f"in {r['chunks']} chunks under {args.out}")
        else:
            r = unpack(args.src, args.out)
            print(f"unpacked {r['tensors']} tensors ({r['mib']:.1f} MiB) into {args.out}")
    except (OSError, ValueError) as e:
        print(f"teacher_pack: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
