#!/usr/bin/env bash
# A teacher worth quantizing, in one seeded command: the synthetic moving-shapes set (one object a clip, so that a
# caption pins down colour, shape, size, speed, direction and background), a small Wan teacher fitted on it with
# megatron_qvgen.fit_teacher, then its samples: a grid (data | teacher) and how often they show what the caption says.
#
#   bash benchmarks/fidelity/fit_teacher.sh gpu   # small_wan (~36 M parameters, 4 x 32 x 32 latents): one GPU, < 10 min
#   bash benchmarks/fidelity/fit_teacher.sh cpu   # small_wan_cpu (~1.2 M parameters, 3 x 16 x 16 latents): a CPU
#
# Stopped part-way (a time-limited call), the same command continues the fit from $OUT/teacher.fit (a resumable
# checkpoint every CHECKPOINT_EVERY = 250 steps) to the same teacher. DATA_SAMPLES overrides the clip count (tests).
# Writes $OUT/data (latent shards), $OUT/teacher (a megatron checkpoint: --init-from / --teacher for every tool),
# $OUT/teacher_samples.json and .png. OUT defaults to outputs/fidelity/<recipe>.
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALE=${1:-gpu}
case "$SCALE" in
  gpu) RECIPE=small_wan;     FRAMES=4; SIZE=32; SAMPLES=${DATA_SAMPLES:-8000}; STEPS=${STEPS:-3000}; BATCH=32; LR=5e-4 ;;
  cpu) RECIPE=small_wan_cpu; FRAMES=3; SIZE=16; SAMPLES=${DATA_SAMPLES:-4000}; STEPS=${STEPS:-2000}; BATCH=16; LR=1e-3 ;;
  *) echo "usage: $0 gpu|cpu" >&2; exit 2 ;;
esac
OUT=${OUT:-outputs/fidelity/$RECIPE}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python data/make_synthetic.py --out "$OUT/data" --samples "$SAMPLES" --samples-per-shard 500 --frames "$FRAMES" \
  --height "$SIZE" --width "$SIZE" --text-len 32 --text-dim 64 --max-objects 1 --seed 0 --no-progress \
  --workers "$(( $(nproc) < 16 ? $(nproc) : 16 ))"
if [ ! -f "$OUT/teacher/qvgen_complete" ]; then
  torchrun --standalone --nproc-per-node 1 -m megatron_qvgen.fit_teacher --recipe "$RECIPE" --out "$OUT/teacher" \
    --steps "$STEPS" --lr "$LR" --data.shards "$OUT/data" --train.global_batch_size "$BATCH" \
    --train.micro_batch_size "$BATCH" --train.seed 0 --checkpoint-every "${CHECKPOINT_EVERY:-250}"
fi
python -m megatron_qvgen.fidelity.teacher_check --teacher "$OUT/teacher" --recipe "$RECIPE" \
  --json "$OUT/teacher_samples.json" --data.shards "$OUT/data"
