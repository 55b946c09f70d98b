"""On a GPU: the converted tiny Wan on megatron (NCCL, TP = 1 and 2 when two GPUs exist) equals diffusers.

The verify CLI runs in a fresh torchrun process so CUDA and NCCL start clean.
"""
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from megatron_qvgen.config import WanConfig

pytestmark = pytest.mark.gpu
ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = WanConfig(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)])
def test_converted_tiny_wan_equals_diffusers_on_gpu(tmp_path, tp, pp):
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs")
    from megatron_qvgen.convert.diffusers_io import diffusers_config_dict, write_diffusers_folder
    from megatron_qvgen.convert.to_megatron import diffusers_to_megatron
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY.diffusers_kwargs())
    write_diffusers_folder(tmp_path / "d", diffusers_config_dict(TINY), model.state_dict().items())
    diffusers_to_megatron(tmp_path / "d", tmp_path / "m", progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp),
               "--master-port", str(_free_port()), os.path.join(ROOT, "tools", "convert", "verify.py"),
               "--diffusers", str(tmp_path / "d"), "--megatron", str(tmp_path / "m"), "--tp", str(tp), "--pp", str(pp)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rel = float(re.search(r"max rel diff ([0-9.e+-]+)", done.stdout).group(1))
    assert rel <= 1e-5, done.stdout
