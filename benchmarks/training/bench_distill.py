"""Time QVGen distillation steps of a recipe (QAT student) against the same run with quantisation off.

    torchrun --nproc-per-node N benchmarks/training/bench_distill.py --recipe wan_1_3b --steps 8 --warmup 3 \\
        --compare-bf16 --json out.json [--section.field value ...]

Runs the real trainer (teacher forward + student forward/backward through megatron's schedules, optimizer
step, rank decay) on synthetic shards made on the fly. Reports per GPU: mean step time after warm-up,
samples/s, model TFLOP/s (the trainer's own FLOP count: student fwd+bwd + teacher fwd, recompute not
counted), peak memory, set-up time (model build + PTQ initialisation), the losses, and with
``--compare-bf16`` the same for a student whose linears are not quantised (``--quant.include ''``).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def _measure(cfg, steps: int, warmup: int) -> dict:
    from megatron_qvgen.models.common.schedule import video_tokens
    from megatron_qvgen.training.loop import Trainer
    from megatron_qvgen.training.monitor import step_flops

    t0 = time.perf_counter()
    trainer = Trainer(cfg).setup()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - t0
    num_micro = cfg.train.num_microbatches(trainer.info.dp_size)
    times = []
    for _ in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer._one_step(num_micro)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured = times[warmup:] or times
    step_s = sum(measured) / len(measured)
    f, h, w = cfg.data.synthetic_latent_size
    shape = (1, cfg.model.in_channels, f, h, w) if cfg.model.arch == "wan" else (1, f, cfg.model.in_channels, h, w)
    tokens = video_tokens(trainer.student[0], shape)
    flops = step_flops(cfg.model, tokens, cfg.train.global_batch_size)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    peak_t = torch.tensor([peak], device=trainer.info.device)
    dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    result = {
        "setup_s": setup_s, "step_s": step_s, "step_times_s": times, "video_tokens": tokens,
        "samples_per_s": cfg.train.global_batch_size / step_s,
        "tflops_per_gpu": flops / step_s / trainer.info.world_size / 1e12,
        "peak_memory_gib_max_over_ranks": float(peak_t.item()), "losses": trainer.state.losses,
        "aux_rank_end": trainer.decay.current_rank(),
    }
    trainer.monitor.close()
    trainer.preemption.uninstall()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compare-bf16", action="store_true")
    parser.add_argument("--json", default=None)
    args, rest = parser.parse_known_args(argv)
    from megatron_qvgen.config import apply_overrides, parse_override_args
    from megatron_qvgen.parallel import destroy_parallel, init_distributed
    from megatron_qvgen.recipes import get_recipe

    cfg = apply_overrides(get_recipe(args.recipe), parse_override_args(rest))
    init_distributed()
    results = {"recipe": args.recipe, "world_size": dist.get_world_size(),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "config": cfg.to_dict(), "qat": _measure(cfg, args.steps, args.warmup)}
    if args.compare_bf16:
        plain = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, include=()))
        results["bf16"] = _measure(plain, args.steps, args.warmup)
        results["qat_over_bf16_step_time"] = results["qat"]["step_s"] / results["bf16"]["step_s"]
    if dist.get_rank() == dist.get_world_size() - 1:
        q = results["qat"]
        line = (f"{args.recipe} world={results['world_size']} tp={cfg.parallel.tensor_parallel} "
                f"pp={cfg.parallel.pipeline_parallel} tokens={q['video_tokens']} | QAT step {q['step_s']:.3f}s "
                f"{q['tflops_per_gpu']:.1f} TFLOP/s/GPU peak {q['peak_memory_gib_max_over_ranks']:.1f} GiB "
                f"setup {q['setup_s']:.1f}s losses {[round(x, 5) for x in q['losses']]}")
        if args.compare_bf16:
            b = results["bf16"]
            line += (f" | bf16 step {b['step_s']:.3f}s {b['tflops_per_gpu']:.1f} TFLOP/s/GPU peak "
                     f"{b['peak_memory_gib_max_over_ranks']:.1f} GiB | QAT/bf16 {results['qat_over_bf16_step_time']:.2f}x")
        print(line, flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
