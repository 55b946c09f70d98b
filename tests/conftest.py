"""Shared fixtures. megatron-core is imported once here so that forked test processes start warm."""
import os
import warnings

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import pytest  # noqa: E402
import torch  # noqa: E402

import megatron.core  # noqa: E402,F401
from megatron_qvgen import cpu_shim  # noqa: E402

cpu_shim.apply()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
