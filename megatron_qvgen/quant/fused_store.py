"""What the fused fake-quant kernels share besides the codes: a correctly rounded store, the autotune lists.

``store_rounded``: on the GPU a plain ``.to(tl.bfloat16)`` already rounds to nearest even, but Triton 3.6's
interpreter truncates float32 -> bfloat16, which would make the CPU checks of the fused kernels disagree
with torch in the last bit. Rounding the bits by hand is exact on both (a few integer ops in a
memory-bound kernel).
"""
import os

import triton
import triton.language as tl

from qvgen_kernels.triton_env import interpreter_requested


def autotune_configs(gpu_specs, interpreter_spec):
    """``triton.Config`` list from (BLOCK_M, BLOCK_N, num_warps) triples. The interpreter runs
    ``interpreter_spec`` only; ``QVGEN_FUSED_AUTOTUNE=0`` keeps only the first GPU triple (tests: no tuning
    runs, fewer compilations)."""
    if interpreter_requested():
        gpu_specs = [interpreter_spec]
    elif os.environ.get("QVGEN_FUSED_AUTOTUNE", "1") == "0":
        gpu_specs = gpu_specs[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in gpu_specs]


@triton.jit
def store_rounded(ptr, offs, v, mask, NATIVE: tl.constexpr):
    """NATIVE (compiled GPU code): the hardware conversion, which rounds to nearest even; otherwise by hand."""
    if NATIVE or ptr.dtype.element_ty != tl.bfloat16:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)
    else:
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 dropped bits
        tl.store(ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
