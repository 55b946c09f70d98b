"""Name-mapping tables: which megatron checkpoint key holds which diffusers parameter, with its shape.

A table is a list of rules whose templates may contain ``{i}`` (the global block index). From a model
config it expands to every parameter of the model, so the converters can check a source checkpoint
completely (missing, unexpected and mis-shaped keys) before writing anything, and parameter counts come
out of the table without building a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_qvgen.convert.errors import ConversionError

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ParamRule:
    megatron: str
    diffusers: str
    shape: Callable[[object], Shape]
    # Present only for configs where this returns True (e.g. Wan's optional cross-attention norm).
    when: Optional[Callable[[object], bool]] = None


@dataclass(frozen=True)
class ParamEntry:
    megatron: str
    diffusers: str
    shape: Shape


class ParamTable:
    def __init__(self, arch: str, rules: Sequence[ParamRule]):
        self.arch = arch
        self.rules = tuple(rules)

    def entries(self, cfg) -> List[ParamEntry]:
        out = []
        for rule in self.rules:
            if rule.when is not None and not rule.when(cfg):
                continue
            indices = range(cfg.num_layers) if "{i}" in rule.megatron else (None,)
            shape = tuple(int(n) for n in rule.shape(cfg))
            for i in indices:
                out.append(ParamEntry(rule.megatron.format(i=i), rule.diffusers.format(i=i), shape))
        return out

    def parameter_count(self, cfg) -> int:
        return sum(math.prod(e.shape) for e in self.entries(cfg))

    def check_keys(self, cfg, found: Dict[str, Shape], *, side: str, where: str,
                   allow_unexpected: bool = False) -> List[str]:
        """Raise ConversionError unless ``found`` (key -> shape) has every expected key of ``side``
        ("megatron" or "diffusers") with its shape; returns the unexpected keys."""
        expected = {getattr(e, side): e.shape for e in self.entries(cfg)}
        missing = sorted(set(expected) - set(found))
        if missing:
            raise ConversionError(f"{where}: {len(missing)} {self.arch} parameters missing, e.g. {_few(missing)}")
        wrong = [f"{k} has shape {tuple(found[k])}, the config needs {expected[k]}"
                 for k in sorted(expected) if tuple(found[k]) != expected[k]]
        if wrong:
            raise ConversionError(f"{where}: checkpoint does not match the model config: {_few(wrong)}")
        unexpected = sorted(set(found) - set(expected))
        if unexpected and not allow_unexpected:
            raise ConversionError(f"{where}: {len(unexpected)} keys that a {self.arch} model of this config "
                                  f"does not have, e.g. {_few(unexpected)}")
        return unexpected


def _few(items: Iterable[str], n: int = 3) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
