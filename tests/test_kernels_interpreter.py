"""Runs the Triton kernel tests in Triton's interpreter when this process cannot (CPU-only CI).

The interpreter must be chosen before triton is first imported, and tests/conftest.py imports megatron.core,
which imports triton: in-process, test_kernels_act_quant.py and test_kernels_gemm.py then skip themselves
(and test_runtime_linear.py its Triton cases). This test runs those files in one child process started with
``TRITON_INTERPRET=1`` and without the conftest (the kernels need no megatron), and passes if they pass.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvgen_kernels.triton_env import interpreter_active

ROOT = Path(__file__).resolve().parent.parent
FILES = ["tests/test_kernels_act_quant.py", "tests/test_kernels_gemm.py", "tests/test_runtime_linear.py",
         "tests/test_attention_triton.py", "tests/test_runtime_attention.py", "tests/test_kernels_fused.py",
         "tests/test_attention_gluon_emulated.py", "tests/test_kernels_gemm_gluon.py"]


@pytest.mark.skipif(torch.cuda.is_available() or interpreter_active(),
                    reason="the kernel tests already run in this process (GPU, or interpreter active)")
def test_kernel_suites_pass_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
           "-W", "ignore::pytest.PytestUnknownMarkWarning", *FILES]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"interpreter run failed:\n{tail}"
    assert " passed" in tail and "skipped" in tail, tail   # the GPU-only cases skip, the rest pass
