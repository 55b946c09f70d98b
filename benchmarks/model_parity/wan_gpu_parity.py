"""A real model config (default Wan2.1-T2V-1.3B; ``--recipe cogvideox_2b`` / ``cogvideox_5b`` too) with random
weights: our megatron model vs diffusers on GPU, TP = 1 and 2.

Run from the repository root on a machine with 2 GPUs (megatron-core and diffusers installed; install
this repository without dependencies first: ``pip install --no-deps -e .``):

    torchrun --nproc-per-node 2 benchmarks/model_parity/wan_gpu_parity.py --json RESULTS.json
    torchrun --nproc-per-node 2 benchmarks/model_parity/wan_gpu_parity.py --recipe cogvideox_2b \
        --workdir /tmp/cogvideox2b_parity --latent-frames 13 --latent-height 30 --latent-width 45 --json RESULTS.json

Rank 0 writes random diffusers weights (fp32) and converts them with the streaming converter; then every
requested layout (TP = 1, 2, and 2 with sequence parallelism; fp32 and bf16) loads the converted checkpoint, runs megatron's pipeline schedule (NCCL), and the rank
holding the prediction compares it with diffusers' transformer (``WanTransformer3DModel`` /
``CogVideoXTransformer3DModel``, called as its pipeline calls it) on the same input. TF32 is
off so fp32 means fp32. Prints one line per (TP, dtype) and a JSON summary (``--json``).
"""
import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from megatron_qvgen.convert.diffusers_io import (diffusers_class, diffusers_config_dict,  # noqa: E402
                                                 write_diffusers_folder)
from megatron_qvgen.convert.to_megatron import diffusers_to_megatron  # noqa: E402
from megatron_qvgen.convert.verify import verify_conversion  # noqa: E402
from megatron_qvgen.parallel import init_distributed  # noqa: E402
from megatron_qvgen.recipes import get_recipe  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_random_diffusers(folder: str, seed: int, recipe: str = "wan_1_3b") -> None:
    """A diffusers folder (config.json + safetensors) of a recipe's real config with random fp32 weights."""
    model_cfg = get_recipe(recipe).model
    torch.manual_seed(seed)
    model = diffusers_class(model_cfg.arch)(**model_cfg.diffusers_kwargs())
    with torch.no_grad():  # move norms and tables away from their trivial initial values
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    write_diffusers_folder(folder, diffusers_config_dict(model_cfg), model.state_dict().items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="wan_1_3b", help="whose model config: wan_1_3b, cogvideox_2b, ...")
    parser.add_argument("--workdir", default="/tmp/wan13b_parity")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-sequence-parallel", action="store_true", help="skip the TP>1 runs with SP")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--latent-frames", type=int, default=6, help="latent frames / temporal patch")
    parser.add_argument("--latent-height", type=int, default=16, help="tokens along height (latent H / 2)")
    parser.add_argument("--latent-width", type=int, default=26, help="tokens along width (latent W / 2)")
    parser.add_argument("--text-len", type=int, default=None,
                        help="text tokens (default: 512 for Wan, max_text_seq_length = 226 for CogVideoX)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = parser.parse_args()
    arch = get_recipe(args.recipe).model.arch
    if args.text_len is None and arch == "wan":
        args.text_len = 512

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_distributed()
    rank = dist.get_rank()
    diffusers_dir = os.path.join(args.workdir, "diffusers")
    megatron_dir = os.path.join(args.workdir, "megatron")
    if rank == 0:
        if not os.path.isdir(diffusers_dir):
            write_random_diffusers(diffusers_dir, args.seed, args.recipe)
        if not os.path.isdir(megatron_dir):
            start = time.time()
            diffusers_to_megatron(diffusers_dir, megatron_dir, arch=arch, tensor_parallel=max(args.tp))
            print(f"converted in {time.time() - start:.1f} s", flush=True)
    dist.barrier()

    results = []
    layouts = [(tp, False) for tp in args.tp]
    if not args.no_sequence_parallel:
        layouts += [(tp, True) for tp in args.tp if tp > 1]
    for dtype in args.dtype:
        for tp, sp in layouts:
            start = time.time()
            report = verify_conversion(diffusers_dir, megatron_dir, tensor_parallel=tp, sequence_parallel=sp,
                                       dtype=DTYPES[dtype],
                                       seed=args.seed, latent_frames=args.latent_frames,
                                       latent_height=args.latent_height, latent_width=args.latent_width,
                                       text_len=args.text_len)
            reports = [None] * dist.get_world_size()
            dist.all_gather_object(reports, None if report is None else vars(report))
            report = next(r for r in reports if r is not None)
            row = {"tp": tp, "sequence_parallel": sp, "dtype": dtype, **report,
                   "seconds": round(time.time() - start, 1)}
            results.append(row)
            if rank == 0:
                print(f"TP={tp}{' SP' if sp else ''} {dtype}: output {tuple(row['shape'])} max abs diff {row['max_abs']:.3e}, "
                      f"max rel diff {row['max_rel']:.3e} (reference max {row['reference_max']:.3e})", flush=True)
    if rank == 0:
        summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   "torch": torch.__version__, "world_size": dist.get_world_size(), "recipe": args.recipe,
                   "command": " ".join(sys.argv),
                   "results": results}
        print(json.dumps(summary, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
