"""Command-line overrides of config fields: ``--train.steps 20 --quant.weight_bits 3``.

Values are parsed by the field's declared type and the whole config is rebuilt, so every override goes
through the same validation as a recipe.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, List, Sequence, Tuple

from megatron_qvgen.config.errors import ConfigError
from megatron_qvgen.config.experiment import ExperimentConfig
from megatron_qvgen.config.model import MODEL_CONFIGS


def parse_override_args(argv: Sequence[str]) -> List[Tuple[str, str]]:
    """``["--a.b", "1", "--c.d=x"]`` -> ``[("a.b", "1"), ("c.d", "x")]``.

    A flag followed by another ``--flag`` (or by nothing) has no value: refused, not swallowed as one.
    """
    pairs, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --section.field, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value (--{key} VALUE or --{key}=VALUE)")
            value = argv[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), value))
    return pairs


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[Tuple[str, str]]) -> ExperimentConfig:
    d = cfg.to_dict()
    for dotted, raw in overrides:
        parts = dotted.split(".")
        if parts == ["name"]:
            d["name"] = raw
            continue
        if len(parts) != 2:
            raise ConfigError(f"override {dotted!r} must look like section.field")
        section, name = parts
        if section not in d or not isinstance(d[section], dict):
            raise ConfigError(f"unknown config section {section!r} in override {dotted!r}")
        klass = _section_class(cfg, section)
        ftype = _field_type(klass, name, dotted)
        d[section][name] = _parse(raw, ftype, dotted)
    return ExperimentConfig.from_dict(d)


def _section_class(cfg: ExperimentConfig, section: str):
    if section == "model":
        return MODEL_CONFIGS[cfg.model.arch]
    return type(getattr(cfg, section))


def _field_type(klass, name: str, dotted: str):
    fields = {f.name: f for f in dataclasses.fields(klass) if f.init}
    if name not in fields:
        raise ConfigError(f"unknown field {dotted!r}; {klass.__name__} has {sorted(fields)}")
    return typing.get_type_hints(klass)[name]


def _parse(raw: str, ftype, dotted: str) -> Any:
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin is typing.Union:
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(raw, inner[0], dotted)
    if origin in (tuple, typing.Tuple):
        items = [s for s in raw.split(",") if s != ""]
        item_type = args[0] if args else str
        return tuple(_parse(s, item_type, dotted) for s in items)
    try:
        if ftype is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if ftype in (int, float, str):
            return ftype(raw)
    except ValueError:
        raise ConfigError(f"cannot parse {raw!r} as {ftype.__name__} for {dotted}") from None
    return raw
