"""Runs tests/test_kernels_sm90.py in a child process when this one cannot compile the kernels for Hopper.

Test files that exercise the kernels in Triton's interpreter set ``TRITON_INTERPRET=1`` while pytest collects
them, so in the full CPU suite the kernels end up decorated for the interpreter and cannot be compiled. The child
starts without that variable and without the conftest (the kernels need no megatron)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from triton.runtime.jit import JITFunction

from qvgen_kernels.attention_triton import _attention_kernel

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(isinstance(_attention_kernel, JITFunction), reason="test_kernels_sm90.py runs in this process")
def test_hopper_compile_checks_pass_in_a_child_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
           "-W", "ignore::pytest.PytestUnknownMarkWarning", "tests/test_kernels_sm90.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"sm_90a compile checks failed:\n{tail}"
    assert " passed" in tail and "skipped" not in tail, tail
