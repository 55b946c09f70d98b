"""Video-latent data: the shard schema, the streaming loader, the synthetic set and the video encoder.

The trainer needs only::

    from megatron_qvgen.data import build_latent_loader, ensure_synthetic_dataset
    ensure_synthetic_dataset(cfg.data, latent_channels, text_len, text_dim)   # no-op unless asked for
    loader = build_latent_loader(cfg.data, micro_batch_size, dp_rank, dp_size, model=cfg.model,
                                 log_bad_samples=tp_rank == 0 and pp_rank == 0)   # shards checked against the model
    batch = next(loader); loader.state_dict(); loader.load_state_dict(state); loader.bad_samples

Every DatasetError is a user's error (a ConfigError): one line naming the file and what to do.
Heavy dependencies (diffusers, transformers, PyAV) are imported only by the encoding tools.
"""
from megatron_qvgen.data.errors import BAD_SAMPLE_REASONS, BadSample, DatasetError
from megatron_qvgen.data.latent_norm import LatentNorm
from megatron_qvgen.data.loader import LatentBatch, LatentLoader, build_latent_loader
from megatron_qvgen.data.manifest import DatasetManifest, read_dataset_manifest, write_dataset_manifest
from megatron_qvgen.data.schema import SCHEMA_VERSION, SampleMeta, decode_sample
from megatron_qvgen.data.shard_writer import ShardWriter
from megatron_qvgen.data.synthetic_shards import SyntheticSpec, ensure_synthetic_dataset, make_synthetic_shards

__all__ = [
    "BAD_SAMPLE_REASONS", "BadSample", "DatasetError", "DatasetManifest", "LatentBatch", "LatentLoader",
    "LatentNorm", "SCHEMA_VERSION", "SampleMeta", "ShardWriter", "SyntheticSpec", "build_latent_loader",
    "decode_sample", "ensure_synthetic_dataset", "make_synthetic_shards", "read_dataset_manifest",
    "write_dataset_manifest",
]
