"""Per-linear W4A4 benchmark against cuBLAS bf16 in the same run (Wan-14B, Wan-1.3B, CogVideoX-2B shapes).

For each (model, linear, tokens): cuBLAS bf16 ``F.linear`` with bias; the Triton activation quantization;
the weight unpack into the shared workspace; the GEMM variants; and the whole runtime ``QuantizedLinear``
forward (quantization + unpack + GEMM). Every GEMM output is checked on the GPU against the int8 path and,
on 256 rows, against the float64 reference, before it is timed. Writes ``results.json`` and prints a table.

    python benchmarks/kernels/bench_linears.py --out DIR [--models wan14b,wan1.3b,cogvideox2b]
        [--tokens 32760,17776] [--sweep] [--extra-variants] [--gluon] [--budget-s 330]

``--gluon`` (Hopper): also qgemm_gluon's K loop (one product group kept in flight) at the default tiles and at
GLUON_TILES; its outputs must equal the Triton kernel's bit for bit to count as the best.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from qvgen_kernels import codes
from qvgen_kernels.act_quant import QuantizedActivations
from qvgen_kernels.act_quant_triton import quantize_per_token_triton
from qvgen_kernels.context import timestep_groups
from qvgen_kernels.format import QuantizationConfig, QuantizedLinearExport
from qvgen_kernels.linear import QuantizedLinear
from qvgen_kernels.qgemm_triton import GemmConfig, default_config, quant_matmul_triton, unpack_weight
from qvgen_kernels.reference import dequant_matmul_float64

SHAPES = {  # (name, in_features K, out_features N)
    "wan14b": [("attn", 5120, 5120), ("ffn_up", 5120, 13824), ("ffn_down", 13824, 5120)],
    "wan1.3b": [("attn", 1536, 1536), ("ffn_up", 1536, 8960), ("ffn_down", 8960, 1536)],
    "cogvideox2b": [("attn", 1920, 1920), ("ffn_up", 1920, 7680), ("ffn_down", 7680, 1920)],
    "tiny": [("attn", 128, 64)],   # CPU dry run of this script under TRITON_INTERPRET=1
}
SWEEP = [  # (block_m, block_n, block_k, num_warps, num_stages, variant); the default config is timed anyway
    (128, 256, 128, 8, 4, "tma"), (128, 256, 128, 8, 4, "tma_persistent"), (256, 128, 128, 8, 4, "tma"),
    (256, 128, 128, 8, 4, "tma_persistent"),
]
SWEEP_TOKENS = (32760,)
GLUON_TILES = (128, 128, 128, 8, 4)   # block_m, block_n, block_k, warps, stages: no epilogue spills (sm90_report)
GROUPS = 50


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bench(fn) -> float:
    if DEVICE == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def make_case(M, K, N, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(M, K, device=DEVICE, generator=gen).to(torch.bfloat16)
    w = (torch.randn(N, K, device=DEVICE, generator=gen) / math.sqrt(K)).to(torch.bfloat16)
    bias = torch.randn(N, device=DEVICE, generator=gen).to(torch.bfloat16)
    scale, zero = codes.weight_qparams_from_range(w.float().amin(1, keepdim=True), w.float().amax(1, keepdim=True), 4)
    q = codes.weight_codes(w, scale, zero, 4)
    lo = torch.sigmoid(torch.randn(GROUPS, device=DEVICE, generator=gen) + 2)
    hi = torch.sigmoid(torch.randn(GROUPS, device=DEVICE, generator=gen) + 2)
    export = QuantizedLinearExport.from_codes(q, scale, zero, lo, hi, 4, bias=bias)
    qconf = QuantizationConfig(weight_bits=4, act_bits=4, act_clip_ratio=0.95, num_timestep_groups=GROUPS)
    module = QuantizedLinear.from_export(export, qconf, device=DEVICE)
    return x, w, bias, module


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def check(y, y_ref_int8, act, weight, bias, what):
    """Relative max error vs the int8 path (whole output) and vs float64 (first 256 rows)."""
    rel = rel_err
    sub = QuantizedActivations(act.codes[:256], act.scale[:256], act.zero[:256], act.rowsum[:256], act.bits)
    r64 = rel(y[:256], dequant_matmul_float64(sub, weight, bias))
    rint = rel(y, y_ref_int8) if y_ref_int8 is not None else 0.0
    if not (math.isfinite(r64) and r64 < 1e-2):
        raise AssertionError(f"{what}: relative error {r64:.2e} vs float64")
    return r64, rint


def run_case(model, name, M, K, N, sweep, extra, log, gluon=False):
    x, w, bias, module = make_case(M, K, N)
    weight = module.packed_weight()
    groups = torch.full((1,), 17, device=DEVICE, dtype=torch.long)
    lo, hi = module.act_clip_lower, module.act_clip_upper
    row = dict(model=model, linear=name, M=M, K=K, N=N)

    row["bf16_ms"] = bench(lambda: F.linear(x, w, bias))
    act_fn = lambda: quantize_per_token_triton(x, groups, M, lo, hi, 0.95, 4)  # noqa: E731
    act = act_fn()
    row["act_quant_ms"] = bench(act_fn)
    ws = torch.empty(N, K, dtype=torch.int8, device=DEVICE)
    row["unpack_ms"] = bench(lambda: unpack_weight(weight, out=ws))
    w8 = unpack_weight(weight)

    ref32 = quant_matmul_triton(act, weight, w8, bias, torch.float32)
    r64, _ = check(ref32, None, act, weight, bias, "int8 ptr")
    row["err_vs_f64"] = r64

    base = asdict(default_config(M, N, K))
    variants = {"default": GemmConfig(**base)}
    if extra:
        variants.update({"ptr": GemmConfig(**{**base, "variant": "ptr"}),
                         "ptr_packed_b": GemmConfig(**{**base, "variant": "ptr", "packed_b": True})})
    if gluon:
        bm, bn, bk, nw, ns = GLUON_TILES
        variants.update({"gluon": GemmConfig(**{**base, "variant": "gluon"}),
                         f"gluon_{bm}x{bn}x{bk}_w{nw}s{ns}": GemmConfig(bm, bn, bk, 8, nw, ns, "gluon")})
    if DEVICE == "cpu":
        variants = {k: GemmConfig(**{**asdict(v), "block_m": 32, "block_n": 32, "block_k": 32})
                    for k, v in variants.items() if v.variant != "gluon"}
    if sweep and M == max(SWEEP_TOKENS):
        for bm, bn, bk, nw, ns, v in SWEEP:
            variants[f"{v}_{bm}x{bn}x{bk}_w{nw}s{ns}"] = GemmConfig(bm, bn, bk, 8, nw, ns, v)
    for key, cfg in variants.items():
        try:
            y = quant_matmul_triton(act, weight, w8, bias, torch.float32, cfg)
            _, rint = check(y, ref32, act, weight, bias, key)
            row[f"gemm_{key}_ms"] = bench(lambda: quant_matmul_triton(act, weight, w8, bias, torch.bfloat16, cfg))
            row[f"gemm_{key}_err_vs_int8"] = rint
        except Exception as e:  # a config that does not compile (shared memory) is recorded, not fatal
            row[f"gemm_{key}_error"] = repr(e)[:200]
            log.write(f"{model} {name} {M}: {key} failed: {e!r}\n")

    # fp8 codes (float32 accumulation): exact only when promoted to full precision every K tile
    act8 = w8f = None
    if extra:
        act8 = quantize_per_token_triton(x, groups, M, lo, hi, 0.95, 4, codes_dtype=torch.float8_e4m3fn)
        w8f = unpack_weight(weight, torch.float8_e4m3fn)
        cfg = variants["default"]
        for promote in (0, cfg.block_k):
            key = f"fp8_promote{promote}"
            try:
                y = quant_matmul_triton(act8, weight, w8f, bias, torch.float32, cfg, fp8_promote_every=promote)
                row[f"gemm_{key}_err_vs_int8"] = rel_err(y, ref32)
                row[f"gemm_{key}_ms"] = bench(
                    lambda: quant_matmul_triton(act8, weight, w8f, bias, torch.bfloat16, cfg, fp8_promote_every=promote))
            except Exception as e:
                row[f"gemm_{key}_error"] = repr(e)[:200]
                log.write(f"{model} {name} {M}: {key} failed: {e!r}\n")

    # the runtime module end to end (packed residency: act quant + unpack + GEMM + python)
    x3 = x.view(1, M, K)
    with timestep_groups(groups):
        y_mod = module(x3)
        assert torch.isfinite(y_mod).all()
        row["module_packed_ms"] = bench(lambda: module(x3))
        module.weight_residency = "int8"
        row["module_int8_ms"] = bench(lambda: module(x3))
        module.weight_residency = "packed"

    gemm_times = {k[5:-3]: v for k, v in row.items() if k.startswith("gemm_") and k.endswith("_ms")}
    exact = {k: v for k, v in gemm_times.items() if row.get(f"gemm_{k}_err_vs_int8", 1.0) < 1e-6}
    best = min(exact, key=exact.get)
    row["best_gemm"] = best
    row["best_gemm_ms"] = exact[best]
    row["bf16_tflops"] = 2 * M * N * K / row["bf16_ms"] * 1e-9
    row["best_gemm_tops"] = 2 * M * N * K / exact[best] * 1e-9
    row["act_quant_gbps"] = M * K * 3 / row["act_quant_ms"] * 1e-6
    row["speedup_gemm_only"] = row["bf16_ms"] / exact[best]
    row["speedup_with_act"] = row["bf16_ms"] / (exact[best] + row["act_quant_ms"])
    row["speedup_with_act_unpack"] = row["bf16_ms"] / (exact[best] + row["act_quant_ms"] + row["unpack_ms"])
    row["speedup_module_packed"] = row["bf16_ms"] / row["module_packed_ms"]
    row["speedup_module_int8"] = row["bf16_ms"] / row["module_int8_ms"]
    bf16_bytes = N * K * 2 + N * 2
    row["weight_bytes_ratio"] = (weight.nbytes() + N * 2) / bf16_bytes
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="wan14b,wan1.3b,cogvideox2b")
    p.add_argument("--tokens", default="32760,17776")
    p.add_argument("--sweep", action="store_true", help="also time the tile-config sweep")
    p.add_argument("--extra-variants", action="store_true", help="also the pointer-based kernel, packed weight "
                   "bytes unpacked in the GEMM, and fp8 codes")
    p.add_argument("--gluon", action="store_true", help="also the Gluon K loop (Hopper only)")
    p.add_argument("--budget-s", type=float, default=330.0)
    args = p.parse_args()
    t0 = time.time()
    rows = []
    log = open(f"{args.out}/bench_log.txt", "w")
    props = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else None
    meta = dict(device=props.name if props else "cpu (interpreter)", sms=props.multi_processor_count if props else 0,
                torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"))
    for model in args.models.split(","):
        for name, K, N in SHAPES[model]:
            for M in (int(t) for t in args.tokens.split(",")):
                if time.time() - t0 > args.budget_s:
                    log.write(f"budget reached: skipped {model} {name} {M}\n")
                    continue
                t1 = time.time()
                row = run_case(model, name, M, K, N, args.sweep, args.extra_variants, log, args.gluon)
                row["wall_s"] = time.time() - t1
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                with open(f"{args.out}/results.json", "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta}")
    print(f"{'model':12s} {'linear':8s} {'M':>6s} {'bf16':>6s} {'act':>6s} {'unpk':>6s} {'gemm':>6s} {'best':>22s} "
          f"{'xGEMM':>6s} {'x+act':>6s} {'x+a+u':>6s} {'xMod':>6s} {'TOPS':>5s} {'wbyte':>5s}")
    for r in rows:
        print(f"{r['model']:12s} {r['linear']:8s} {r['M']:6d} {r['bf16_ms']:6.3f} {r['act_quant_ms']:6.3f} "
              f"{r['unpack_ms']:6.3f} {r['best_gemm_ms']:6.3f} {r['best_gemm']:>22s} {r['speedup_gemm_only']:6.2f} "
              f"{r['speedup_with_act']:6.2f} {r['speedup_with_act_unpack']:6.2f} {r['speedup_module_packed']:6.2f} "
              f"{r['best_gemm_tops']:5.0f} {r['weight_bytes_ratio']:5.3f}")


if __name__ == "__main__":
    main()
