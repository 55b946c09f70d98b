"""QAT linear forward+backward against a bf16 linear on one GPU (project issue 2).

For each Wan shape (M tokens x K -> N), times forward+backward of
  (a) ``torch.nn.functional.linear`` in bf16 (cuBLAS): the baseline of every ratio;
  (a2) megatron's ColumnParallelLinear in bf16 (our layer with quantisation off);
  (b) QuantColumnParallelLinear, W4A4, auxiliary rank 32 at mid-decay (gate 0.5), bf16 parameters, on the
      reference torch fake-quant path (forced by making the dispatch point find no fused module);
  (c) the same layer on the fused Triton path;
with peak extra memory, a numerical comparison of (b) and (c), the device-time split of (c) by kernel
(torch.profiler), and timings of the fake quantisers alone. Megatron's parallel state is initialised on
one rank with NCCL (TP = 1). A short table is printed last; everything is also written as JSON.

    python benchmarks/qat_linear/bench_qat_linear.py --out /tmp/qat_bench
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

SHAPES = {  # name: (in_features K, out_features N)
    "wan14b_attn": (5120, 5120),
    "wan14b_ffn_up": (5120, 13824),
    "wan14b_ffn_down": (13824, 5120),
    "wan1.3b_ffn_up": (1536, 8960),
}
GATE = 0.5          # mid-decay: the decaying half of the rank-32 factors at gamma = 0.5
GROUP = 17          # any timestep group


# ---------------------------------------------------------------- set-up
def init_megatron():
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron_qvgen.config import ParallelConfig
    from megatron_qvgen.parallel import init_distributed, initialize_parallel

    init_distributed()  # nccl on a GPU
    return initialize_parallel(ParallelConfig(tensor_parallel=1), seed=1234)


def make_layer(k, n, quant):
    from megatron.core import ModelParallelConfig

    from megatron_qvgen.quant import QuantColumnParallelLinear, initialize_quantizers

    cfg = ModelParallelConfig(tensor_model_parallel_size=1, params_dtype=torch.bfloat16)
    layer = QuantColumnParallelLinear(k, n, config=cfg, init_method=lambda w: torch.nn.init.normal_(w, std=0.02),
                                      bias=True, gather_output=False, quant=quant, name="blocks.0.ffn.net.0.proj")
    with torch.no_grad():
        layer.bias.normal_(std=0.02)
    if quant is not None:
        assert initialize_quantizers([layer]) == 1
    return layer


@contextlib.contextmanager
def reference_path():
    """The dispatch point sees no fused module: every call takes the torch reference."""
    from megatron_qvgen.quant import fake_quant

    saved = fake_quant._fused
    fake_quant._fused = lambda: None
    try:
        yield
    finally:
        fake_quant._fused = saved


def layer_step(layer, x, gy):
    from megatron_qvgen.quant import quant_context

    groups = torch.tensor([GROUP], device=x.device)

    def step():
        with quant_context(timestep_groups=groups, aux_gate=GATE):
            y, _ = layer(x)
        y.backward(gy)
        return y

    return step


# ---------------------------------------------------------------- measuring
def time_ms(step, params, rep_ms):
    import triton.testing

    step()   # compilation and autotuning stay out of do_bench's own estimate of the step time
    for p in params:
        p.grad = None
    return triton.testing.do_bench(step, warmup=max(50, rep_ms // 4), rep=rep_ms, grad_to_none=params,
                                   return_mode="median")


def peak_extra_mib(step, params):
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for p in params:
        p.grad = None
    return peak / 2**20


def rel_diff(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare_paths(layer, x, gy):
    """max |fused - reference| / max |reference| of the output and every gradient."""
    params = dict(layer.named_parameters())
    results = {}
    for tag, ctx in (("fused", contextlib.nullcontext()), ("reference", reference_path())):
        for p in list(params.values()) + [x]:
            p.grad = None
        with ctx:
            y = layer_step(layer, x, gy)()
        results[tag] = {"y": y.detach(), "dx": x.grad.clone(),
                        **{n: p.grad.clone() for n, p in params.items() if p.grad is not None}}
    for p in list(params.values()) + [x]:
        p.grad = None
    return {name: rel_diff(results["fused"][name], ref) for name, ref in results["reference"].items()}


def classify(kernel):
    k = kernel.lower()
    for tag, label in (("act_fake_quant_fwd", "act fake-quant fwd"), ("act_fake_quant_bwd", "act fake-quant bwd"),
                       ("row_range", "act row range"), ("weight_fake_quant_fwd", "weight fake-quant fwd"),
                       ("bwd_rows", "weight fake-quant bwd (dW, ds, dz, dL)"),
                       ("bwd_right", "weight fake-quant bwd (dR)")):
        if tag in k:
            return label
    if any(t in k for t in ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas")):
        return "GEMM (cuBLAS)"
    if "reduce" in k or "sum" in k:
        return "reductions (torch)"
    return "elementwise/copies (torch)"


def kernel_split(step, params, iters=3):
    """Device time per kernel class over ``iters`` steps, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for p in params:
                p.grad = None
            step()
        torch.cuda.synchronize()
    split = defaultdict(float)
    kernels = {}
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = evt.self_cuda_time_total
        if device_us > 0:
            split[classify(evt.key)] += device_us / 1e3 / iters
            kernels[evt.key[:90]] = round(device_us / 1e3 / iters, 4)
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    return dict(sorted(split.items(), key=lambda kv: -kv[1])), top


def quantizer_pieces(layer, x, rep_ms):
    """Forward and forward+backward of each fake quantiser alone, reference vs fused (ms)."""
    from megatron_qvgen.quant import fake_quant, quant_context

    wq, aq = layer.weight_quantizer, layer.act_quantizer
    groups = torch.tensor([GROUP], device=x.device)
    a_lo, a_hi = aq.clip_factors(groups)
    a_lo, a_hi = a_lo.detach().requires_grad_(True), a_hi.detach().requires_grad_(True)
    rank = layer.aux_rank
    with quant_context(aux_gate=GATE):
        gamma = layer.aux_gamma()
    aux_l = (layer.aux_L[:, :rank].detach().float() * gamma).requires_grad_(True)
    aux_r = layer.aux_R[:rank].detach().requires_grad_(True)
    weight = layer.weight.detach().requires_grad_(True)
    scale, zero = wq.scale.detach().requires_grad_(True), wq.zero_point.detach().requires_grad_(True)
    xg = x.detach().requires_grad_(True)
    gx = torch.randn_like(x)
    gw = torch.randn_like(layer.weight)

    def act(backward):
        def run():
            y = fake_quant.fake_quant_activation(xg, a_lo, a_hi, aq.clip_ratio, aq.bits)
            if backward:
                y.backward(gx)
        return run

    def wt(backward):
        def run():
            y = fake_quant.fake_quant_weight(weight, scale, zero, wq.bits, wq.grad_factor, aux_l, aux_r, torch.bfloat16)
            if backward:
                y.backward(gw)
        return run

    leaves = [xg, a_lo, a_hi, weight, scale, zero, aux_l, aux_r]
    out = {}
    # forward codes at the autotuned configs: bit-identical to the reference (weights without the aux term,
    # whose rank-r product is summed in another order)
    with torch.no_grad():
        forwards = {}
        for path, ctx in (("ref", reference_path), ("fused", contextlib.nullcontext)):
            with ctx():
                forwards[path] = (fake_quant.fake_quant_activation(x, a_lo, a_hi, aq.clip_ratio, aq.bits),
                                  fake_quant.fake_quant_weight(layer.weight, wq.scale, wq.zero_point, wq.bits,
                                                               wq.grad_factor, None, None, torch.bfloat16))
        out["act_forward_bit_identical"] = bool(torch.equal(forwards["ref"][0], forwards["fused"][0]))
        out["weight_forward_bit_identical"] = bool(torch.equal(forwards["ref"][1], forwards["fused"][1]))
        del forwards
    for path, ctx in (("ref", reference_path), ("fused", contextlib.nullcontext)):
        with ctx():
            for name, fn in (("act_fwd", act(False)), ("act_fwdbwd", act(True)), ("w_fwd", wt(False)),
                             ("w_fwdbwd", wt(True))):
                out[f"{path}_{name}"] = time_ms(fn, leaves, rep_ms)
    act_bytes = x.numel() * x.element_size()
    # fused forward moves x in and x_hat out (2 passes); backward moves x, grad in, dx out (3 passes)
    out["fused_act_fwd_GBps"] = 2 * act_bytes / out["fused_act_fwd"] / 1e6   # reads x once, writes x_hat
    out["fused_act_bwd_GBps"] = 3 * act_bytes / max(out["fused_act_fwdbwd"] - out["fused_act_fwd"], 1e-6) / 1e6
    return out


# ---------------------------------------------------------------- main
def run_shape(name, k, n, tokens, rep_ms, args):
    from megatron_qvgen.config import QuantConfig

    torch.manual_seed(0)
    x = torch.randn(tokens, 1, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(tokens, 1, n, device="cuda", dtype=torch.bfloat16)
    row = {"shape": name, "M": tokens, "K": k, "N": n}

    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
    b = torch.zeros(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def plain():
        F.linear(x, w, b).backward(gy)

    row["bf16_ms"] = time_ms(plain, [x, w, b], rep_ms)
    row["bf16_peak_mib"] = peak_extra_mib(plain, [x, w, b])
    del w, b

    mlayer = make_layer(k, n, None)
    mparams = [x] + list(mlayer.parameters())
    mstep = layer_step(mlayer, x, gy)
    row["megatron_bf16_ms"] = time_ms(mstep, mparams, rep_ms)
    row["megatron_bf16_kernel_split_ms"], row["megatron_bf16_top_kernels_ms"] = kernel_split(mstep, mparams)
    del mlayer, mstep

    qlayer = make_layer(k, n, QuantConfig(weight_bits=4, act_bits=4, aux_rank=32))
    qparams = [x] + list(qlayer.parameters())
    qstep = layer_step(qlayer, x, gy)
    with reference_path():
        row["reference_ms"] = time_ms(qstep, qparams, rep_ms)
        row["reference_peak_mib"] = peak_extra_mib(qstep, qparams)
    row["fused_ms"] = time_ms(qstep, qparams, rep_ms)
    row["fused_peak_mib"] = peak_extra_mib(qstep, qparams)
    row["fused_ms_again"] = time_ms(qstep, qparams, rep_ms)   # spread between two identical measurements
    row["reference_ratio"] = row["reference_ms"] / row["bf16_ms"]
    row["fused_ratio"] = row["fused_ms"] / row["bf16_ms"]
    row["fused_vs_megatron_bf16"] = row["fused_ms"] / row["megatron_bf16_ms"]
    row["max_rel_diff_fused_vs_reference"] = compare_paths(qlayer, x, gy)
    row["fused_kernel_split_ms"], row["fused_top_kernels_ms"] = kernel_split(qstep, qparams)
    with reference_path():
        row["reference_kernel_split_ms"], _ = kernel_split(qstep, qparams)
    row["quantizer_pieces_ms"] = quantizer_pieces(qlayer, x, rep_ms)
    return row


def print_table(rows, device):
    print(f"\nQAT linear forward+backward, {device}, W4A4, aux rank 32 (gate {GATE}), bf16 params, TP=1")
    head = (f"{'shape':17} {'M':>6} {'K':>6} {'N':>6} {'bf16 ms':>8} {'mcore ms':>8} {'ref ms':>8} {'ref x':>6} "
            f"{'fused ms':>8} {'fused x':>7} {'peak MiB bf16/ref/fused':>24}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['shape']:17} {r['M']:6d} {r['K']:6d} {r['N']:6d} {r['bf16_ms']:8.2f} {r['megatron_bf16_ms']:8.2f} "
              f"{r['reference_ms']:8.2f} {r['reference_ratio']:6.2f} {r['fused_ms']:8.2f} {r['fused_ratio']:7.3f} "
              f"{r['bf16_peak_mib']:8.0f}/{r['reference_peak_mib']:.0f}/{r['fused_peak_mib']:.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=32760, help="M: 32760 = Wan 480p, 81 frames")
    parser.add_argument("--rep-ms", type=int, default=400, help="do_bench time budget per measurement")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for results.json")
    args = parser.parse_args()

    info = init_megatron()
    device = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, triton {__import__('triton').__version__})"
    print(f"device: {device}; world {info.world_size}, TP {info.tp_size}", flush=True)
    rows = []
    for name in args.shapes:
        k, n = SHAPES[name]
        t0 = time.time()
        row = run_shape(name, k, n, args.tokens, args.rep_ms, args)
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:   # after every shape: a cut-off run keeps some
            json.dump({"device": device, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"device": device, "date": time.strftime("%Y-%m-%d"), "rows": rows,
                   "autotuned_configs": autotuned_configs()}, f, indent=1)
    print(json.dumps(autotuned_configs(), indent=1))
    print_table(rows, device)


def autotuned_configs():
    """The block sizes each autotuned kernel picked, by tuning key."""
    from megatron_qvgen.quant import fused_act_kernels, fused_weight_kernels

    kernels = (fused_act_kernels.act_fake_quant_fwd_kernel, fused_act_kernels.act_fake_quant_bwd_kernel,
               fused_weight_kernels.weight_fake_quant_fwd_kernel, fused_weight_kernels.weight_fake_quant_bwd_rows_kernel)
    return {k.base_fn.__name__: {str(key): str(cfg) for key, cfg in getattr(k, "cache", {}).items()} for k in kernels}


if __name__ == "__main__":
    main()
