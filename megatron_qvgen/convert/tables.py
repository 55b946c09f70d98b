"""The name-mapping table of each architecture."""
from __future__ import annotations

from megatron_qvgen.convert.errors import ConversionError
from megatron_qvgen.convert.mapping import ParamTable


def table_for(arch: str) -> ParamTable:
    if arch == "wan":
        from megatron_qvgen.convert.wan_names import WAN_TABLE

        return WAN_TABLE
    if arch == "cogvideox":
        from megatron_qvgen.convert.cogvideox_names import COGVIDEOX_TABLE

        return COGVIDEOX_TABLE
    raise ConversionError(f"no conversion table for model arch {arch!r} yet")
