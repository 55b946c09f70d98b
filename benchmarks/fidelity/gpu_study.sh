#!/usr/bin/env bash
# The whole fidelity study on one GPU: the small_wan teacher (fit_teacher.sh gpu), then the five methods x W4A4/W3A3
# x 3 seeds at equal budget, JOBS runs at once on the one GPU (each small run uses a fraction of an H200), then
# results.json / results.md / plots. Extra arguments go to run_study.py (e.g. --train.lr 3e-5). Settings:
# TEACHER_STEPS (3000), STUDY_STEPS (400), JOBS (6), FID (outputs/fidelity/small_wan), RESULTS, DEADLINE, BUNDLE,
# PACK_TO (a folder: the fitted teacher packed there in <= 15 MiB files that a lent machine can send back) and
# TEACHER_PACK (such a folder, carried in: the teacher is restored from it instead of fitted again).
#
#   bash benchmarks/fidelity/gpu_study.sh [all|teacher|study] [run_study.py arguments]
#
# On a machine without a time limit, `all` (the default) does everything. On the lent GPU a command runs for at
# most 10 minutes and a warm machine keeps the ignored outputs/ folder between calls, so it is done in calls of
# DEADLINE seconds, each continuing the last (the teacher fit from its checkpoint every 250 steps, the study from
# the runs already recorded and from the checkpoints of those stopped at the deadline), each packing what it made
# into one archive, $BUNDLE. Carry nothing under $RESULTS into a warm machine's later call: a carried path replaces
# the one there, and with it the records of the calls before.
#
#   source benchmarks/training/device_env.sh && DEADLINE=540 BUNDLE=$OUT/fidelity.tgz bash benchmarks/fidelity/gpu_study.sh teacher
#   source benchmarks/training/device_env.sh && DEADLINE=540 BUNDLE=$OUT/fidelity.tgz bash benchmarks/fidelity/gpu_study.sh study
#                                                   # again while it exits 3 (runs left)
#
# Budget (measured on an H200, 2026-12-05): teacher stage 8 min (8000 clips in seconds, 3000 steps x 32 clips at
# ~6.8 steps/s, samples, pack); study 400 steps x 16 clips a run, 5 runs at once taking 180-300 s each: about 12 min
# per bit width (1 PTQ + 12 trained runs, 16 prompts x 20 sampler steps each). A trained run holds about 9 GiB of
# GPU memory: JOBS <= 7 on an H100 (13 at once ran out of memory there, 2026-12-05), <= 14 on an H200.
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=all
case "${1:-}" in all|teacher|study) STAGE=$1; shift ;; esac
SCALE=${SCALE:-gpu}                          # cpu: the small_wan_cpu recipe (a dry run of the plumbing)
RECIPE=small_wan; [ "$SCALE" = cpu ] && RECIPE=small_wan_cpu
FID=${FID:-outputs/fidelity/$RECIPE}
RESULTS=${RESULTS:-outputs/fidelity/study_$SCALE}   # benchmarks/fidelity/results/ holds the recorded ones
DEADLINE=${DEADLINE:-}
started=$SECONDS
rc=0

left() {  # seconds of the deadline still to spend (a large number without one)
  if [ -n "$DEADLINE" ]; then echo $(( DEADLINE - (SECONDS - started) )); else echo 999999; fi
}

if [ "$STAGE" != study ]; then
  if [ -n "${TEACHER_PACK:-}" ] && [ ! -f "$FID/teacher/qvgen_complete" ]; then
    # a teacher fitted earlier and carried back in (teacher_pack.py): no second fit
    restored="$FID/teacher_restored.$$"
    python benchmarks/fidelity/teacher_pack.py unpack --src "$TEACHER_PACK" --out "$restored" &&
      python tools/convert/diffusers_to_megatron.py --src "$restored" --dst "$FID/teacher" --no-progress || exit 2
  fi
  # fit_teacher.sh reads STEPS as the teacher's steps: TEACHER_STEPS here, never the study's
  env -u STEPS ${TEACHER_STEPS:+STEPS=$TEACHER_STEPS} OUT="$FID" timeout "$(left)" \
    bash benchmarks/fidelity/fit_teacher.sh "$SCALE"
  rc=$?
  [ $rc -eq 124 ] && echo "teacher fit stopped at the deadline: the same command continues it" >&2
  if [ $rc -eq 0 ] && [ -n "${PACK_TO:-}" ] && [ ! -f "$PACK_TO/teacher_pack.json" ]; then
    # the teacher in files small enough to come back from a lent machine (teacher_pack.py)
    [ -d "$FID/teacher_diffusers" ] ||
      python tools/convert/megatron_to_diffusers.py --src "$FID/teacher" --dst "$FID/teacher_diffusers" --no-progress
    python benchmarks/fidelity/teacher_pack.py pack --src "$FID/teacher_diffusers" --out "$PACK_TO" ||
      echo "the teacher could not be packed: it stays on this machine only" >&2
  fi
fi
if [ "$STAGE" != teacher ] && [ $rc -eq 0 ]; then
  if [ ! -f "$FID/teacher/qvgen_complete" ]; then
    echo "no fitted teacher in $FID/teacher: run the teacher stage first" >&2; rc=2
  else
    deadline=()
    [ -n "$DEADLINE" ] && deadline=(--deadline-s "$(( $(left) - 60 ))")   # a minute to gather and plot
    python benchmarks/fidelity/run_study.py --teacher "$FID/teacher" --recipe "$RECIPE" --data "$FID/data" \
      --out "$RESULTS" --jobs "${JOBS:-6}" --steps "${STUDY_STEPS:-400}" "${deadline[@]}" "$@"
    rc=$?
  fi
fi
made=$(ls -d "$FID"/teacher_samples.* "$RESULTS" 2>/dev/null)
if [ -n "${BUNDLE:-}" ] && [ -n "$made" ]; then
  # one archive: the lent machine sends back at most 8 files
  # (without the checkpoints of runs stopped at the deadline: the next call on this machine reads them)
  tar czf "$BUNDLE" --exclude="${RESULTS%/}/resume" $made && echo "packed $(du -h "$BUNDLE" | cut -f1) into $BUNDLE"
fi
exit $rc
