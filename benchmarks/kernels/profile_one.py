"""Run the activation quantization and one GEMM of a linear once each, for Nsight Compute to profile.

    ncu -k regex:"_gemm|_act_quant" --section SpeedOfLight python benchmarks/kernels/profile_one.py \
        --M 32760 --K 5120 --N 5120 --variant ptr
"""
import argparse

import torch

from benchmarks.kernels.bench_linears import make_case
from qvgen_kernels.act_quant_triton import quantize_per_token_triton
from qvgen_kernels.qgemm_triton import default_config, quant_matmul_triton, unpack_weight


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--M", type=int, default=32760)
    p.add_argument("--K", type=int, default=5120)
    p.add_argument("--N", type=int, default=5120)
    p.add_argument("--variant", default="ptr")
    a = p.parse_args()
    x, _, bias, module = make_case(a.M, a.K, a.N)
    weight = module.packed_weight()
    groups = torch.zeros(1, dtype=torch.long, device="cuda")
    act = quantize_per_token_triton(x, groups, a.M, module.act_clip_lower, module.act_clip_upper, 0.95, 4)
    w8 = unpack_weight(weight)
    cfg = default_config(a.M, a.N, a.K, a.variant)
    quant_matmul_triton(act, weight, w8, bias, torch.bfloat16, cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
