#!/usr/bin/env python
"""Does the quantized attention cost a trained W4A4 export anything? The issue's whole-model quality row.

The same export is loaded three ways (bf16 attention, int8 Q.K / fp8 P.V attention, and bf16 attention with the
whole runtime in float32, the arithmetic-noise reference) and sampled with the evaluation tool's sampler on the
same prompts and noise as the teacher. It reports each against the teacher and, what the 2 % target is about,
int8 against bf16 attention directly (final latents, relative L2).

    python benchmarks/runtime/attention_fidelity.py --teacher T --export E --recipe small_wan_cpu --json OUT.json \\
        [--samples 16] [--sampling-steps 20] [--section.field value ...]   # e.g. --data.shards D: the prompts

On a CPU the int8 attention runs its torch twin (the same codes and scales as the Triton kernel), on a GPU the
kernel itself.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from quality import rel_l2

VARIANTS = {  # name: (attention, float32 compute)
    "bf16 attention": ("bf16", False),
    "int8 attention": ("int8", False),
    "bf16 attention, fp32 compute": ("bf16", True),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--export", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sampling-steps", type=int, default=20)
    args, rest = p.parse_known_args(argv)
    from megatron_qvgen.cli import quiet_console

    quiet_console()   # before megatron is imported
    from megatron_qvgen.config import parse_override_args
    from megatron_qvgen.fidelity.pipeline import EvalOptions, measure
    from megatron_qvgen.fidelity.session import close_single_process, open_single_process
    from megatron_qvgen.fidelity.students import RuntimeDenoiser, load_teacher, resolve_student, run_config
    from qvgen_kernels.runtime import load_transformer

    cfg = run_config(resolve_student(args.export), args.recipe, parse_override_args(rest))
    options = EvalOptions(samples=args.samples, sampling_steps=args.sampling_steps)
    info = open_single_process(seed=options.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, finals = {}, {}
    try:
        teacher = load_teacher(args.teacher, cfg)
        for name, (attention, fp32) in VARIANTS.items():
            runtime = load_transformer(args.export, device=device, attention=attention)
            if fp32:
                runtime = runtime.float()
            start = time.perf_counter()
            result, _, _ = measure(teacher, RuntimeDenoiser(runtime), cfg, options, info.device,
                                   keep=options.samples)
            finals[name] = result.student_samples
            rows[name] = {"rel_l2_vs_teacher": result.results["rel_l2"], "psnr_db": result.results["psnr_db"],
                          "seconds": time.perf_counter() - start}
            print(f"{name:30s} vs teacher: rel_l2 {rows[name]['rel_l2_vs_teacher']:.4f}, "
                  f"PSNR {rows[name]['psnr_db']:.2f} dB", flush=True)
    finally:
        close_single_process()
    final = {name: torch.cat(samples) for name, samples in finals.items()}
    direct = {"int8 vs bf16 attention": rel_l2(final["int8 attention"], final["bf16 attention"]),
              "bf16 vs fp32 compute (noise floor)": rel_l2(final["bf16 attention"],
                                                           final["bf16 attention, fp32 compute"])}
    for name, value in direct.items():
        print(f"{name:36s} final-latent rel_l2 {value:.4f}")
    record = {"date": str(date.today()), "device": torch.cuda.get_device_name() if device == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__, "command": " ".join(sys.argv),
              "teacher": args.teacher, "export": args.export, "samples": args.samples,
              "sampling_steps": args.sampling_steps, "vs_teacher": rows, "direct": direct}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
