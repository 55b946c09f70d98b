"""A preparation run as a command: one report and one exit status for all processes, user errors said once.

Under torchrun the processes join a gloo group only to meet at the end: none exits before the others are
done (torchrun stops every process as soon as one exits non-zero, which would cut the others' work short);
rank 0 packs what is left, prints one summary with every failure, and all exit with the same status. A
user's error (ConfigError) met by any process is printed once, by rank 0. Launched otherwise (``--rank`` /
``--world`` by hand, a SLURM array) each process reports its own share.

Exit status: 0 done; 1 some videos failed (0 with ``allow_failures``); 2 a usage or data error.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from typing import Callable, Dict, List, Optional

import torch.distributed as dist

from megatron_qvgen.config.errors import ConfigError
from megatron_qvgen.data.prepare import PrepareOptions, PrepareReport, finish_preparation, prepare_latent_shards

EXIT_OK, EXIT_FAILED_VIDEOS, EXIT_USER_ERROR = 0, 1, 2
# Processes meet only at the end; one that stopped early (a user error) waits for the others' whole run.
_WAIT_FOR_OTHERS = datetime.timedelta(days=7)
_LISTED_FAILURES = 50


def run_preparation(make_options: Callable[[], PrepareOptions], rank: int, world: int,
                    allow_failures: bool = False) -> int:
    joined = _join_group(rank, world)
    together = dist.is_available() and dist.is_initialized() and dist.get_world_size() == world > 1
    opts: Optional[PrepareOptions] = None
    try:
        opts = make_options()
        outcome = {"report": dataclasses.asdict(prepare_latent_shards(opts))}
    except ConfigError as exc:
        outcome = {"error": str(exc)}
    outcomes = [outcome]
    if together:
        outcomes = [None] * world
        dist.all_gather_object(outcomes, outcome)
    try:
        errors = [o["error"] for o in outcomes if "error" in o]
        if errors:
            if rank == 0 or not together:
                print(f"error: {errors[0]}", file=sys.stderr)
            return EXIT_USER_ERROR
        report = _merged([o["report"] for o in outcomes])
        if together and rank == 0:
            packed, report.shards_complete = finish_preparation(opts)
            report.packed |= packed
        if rank == 0 or not together:
            print(format_report(report, opts, None if together or world == 1 else (rank, world), allow_failures))
        return EXIT_FAILED_VIDEOS if report.failures and not allow_failures else EXIT_OK
    finally:
        if together:
            dist.barrier()  # rank 0 prints before anyone exits (and torchrun stops the rest)
        if joined:
            dist.destroy_process_group()


def _join_group(rank: int, world: int) -> bool:
    """Join torchrun's processes (a gloo group, CPU only) when launched by it; True if this call made the group."""
    if world < 2 or (dist.is_available() and dist.is_initialized()):
        return False
    env = os.environ
    if not env.get("MASTER_ADDR") or env.get("WORLD_SIZE") != str(world) or env.get("RANK") != str(rank):
        return False
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=_WAIT_FOR_OTHERS)
    return True


def _merged(reports: List[Dict]) -> PrepareReport:
    merged = PrepareReport(videos=reports[0]["videos"], shards_total=reports[0]["shards_total"],
                           captions_without_video=reports[0]["captions_without_video"],
                           replaced_settings=reports[0]["replaced_settings"])
    for r in reports:
        for name in ("assigned", "already_done", "encoded", "retried"):
            setattr(merged, name, getattr(merged, name) + r[name])
        merged.failures += [tuple(f) for f in r["failures"]]
        merged.packed |= set(r["packed"])
        merged.shards_complete = max(merged.shards_complete, r["shards_complete"])
    merged.failures.sort()
    return merged


def format_report(report: PrepareReport, opts: PrepareOptions, share: Optional[tuple], allow_failures: bool) -> str:
    """The summary; ``share`` = (rank, world) when it covers one process's videos only."""
    lines = []
    names = report.captions_without_video
    if names and (share is None or share[0] == 0):
        lines.append(f"{len(names)} captions name no video: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    scope = (f"rank {share[0]}/{share[1]}: {report.assigned} of {report.videos} videos are this process's"
             if share else f"{report.videos} videos")
    retried = f" ({report.retried} had failed before)" if report.retried else ""
    lines.append(f"{scope}: {report.encoded} encoded now, {report.already_done} done before, "
                 f"{len(report.failures)} failed{retried}; {report.shards_packed} shards written, "
                 f"{report.shards_complete}/{report.shards_total} complete in {opts.out_dir}")
    for video, why in report.failures[:_LISTED_FAILURES]:
        named = why.split(": ", 1)[0].endswith(video)  # video errors start with the file's path
        lines.append(f"  failed: {why}" if named else f"  failed: {video}: {why}")
    if len(report.failures) > _LISTED_FAILURES:
        lines.append(f"  ... and {len(report.failures) - _LISTED_FAILURES} more")
    if report.failures:
        lines.append("  (skipped: --allow-failures)" if allow_failures else
                     "  (they are tried again on the next run; --allow-failures exits 0 without them)")
    return "\n".join(lines)
