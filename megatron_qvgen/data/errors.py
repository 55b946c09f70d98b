"""The two ways data goes wrong: one sample is bad (skip and count it), or the dataset is (stop, name it)."""
from __future__ import annotations

from megatron_qvgen.config.errors import ConfigError

# Why a sample was skipped; the loader's `bad_samples` counter is keyed by these.
BAD_SAMPLE_REASONS = (
    "unreadable",         # the file could not be read (I/O error)
    "truncated",          # the shard ends inside the sample
    "missing_member",     # latent.npy, text.npy or json absent
    "unexpected_member",  # a member of another type (e.g. .pickle): never decoded
    "corrupt_npy",        # not a valid, pickle-free .npy
    "bad_json",           # not valid UTF-8 JSON of the sample schema
    "wrong_meta",         # valid JSON that disagrees with the dataset (other VAE / text encoder / schema)
    "wrong_dtype",        # arrays must be float16
    "wrong_shape",        # shape differs from the json, the index or the dataset
    "non_finite",         # NaN or inf in the latent or the text embedding
)


class BadSample(Exception):
    """One sample cannot be used; ``reason`` is one of BAD_SAMPLE_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in BAD_SAMPLE_REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DatasetError(ConfigError):
    """The dataset as a whole is unusable (missing manifest, corrupt index, too many bad samples in a row,
    shards that do not fit the model), or a data-preparation run cannot go on (other settings, other videos).

    A user's error, not a bug: it subclasses the project's user-facing :class:`ConfigError`, which the entry
    points print as one line from rank 0. The message is one line, names the file or shard and says what to do.
    """
