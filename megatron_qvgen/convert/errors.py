"""The exception type of checkpoint conversion: a missing, corrupt or mismatched checkpoint or folder.

A kind of ``megatron_qvgen.dist_ckpt.CheckpointError``, so callers handle every checkpoint problem alike.
"""
from megatron_qvgen.dist_ckpt import CheckpointError


class ConversionError(CheckpointError):
    """A checkpoint or diffusers folder cannot be converted or loaded; the message names the file, key or field."""
