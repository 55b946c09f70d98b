"""Store a float32 tile into a tensor of any float dtype with torch's rounding (to nearest, ties to even).

On the GPU a plain ``.to(tl.bfloat16)`` already rounds to nearest even, but Triton 3.6's interpreter
truncates float32 -> bfloat16, which would make the CPU checks of the fused kernels disagree with torch in
the last bit. Rounding the bits by hand is exact on both (and a few integer ops in a memory-bound kernel).
"""
import triton
import triton.language as tl


@triton.jit
def store_rounded(ptr, offs, v, mask):
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 dropped bits
        tl.store(ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)
