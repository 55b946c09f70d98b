#!/usr/bin/env bash
# The whole fidelity study on one GPU, one command: the small_wan teacher (fit_teacher.sh gpu, < 10 min), then the five
# methods x W4A4/W3A3 x 3 seeds at equal budget, JOBS runs at once on the one GPU (each small run uses a fraction of
# an H200), then results.json / results.md / plots. Extra arguments go to run_study.py (e.g. --train.lr 3e-5).
#
#   bash benchmarks/fidelity/gpu_study.sh                      # on a machine set up like the repo's venv
#   source benchmarks/training/device_env.sh && bash benchmarks/fidelity/gpu_study.sh   # on the lent GPU image
#
# Budget (estimated, NOT yet measured: no GPU was lent to the session that wrote it): teacher 3000 steps x 32 clips
# of 1024 tokens; study 24 trained runs x 400 steps x 16 clips + 2 PTQ evaluations, 16 prompts x 20 sampler steps each.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-outputs/fidelity/small_wan}
bash benchmarks/fidelity/fit_teacher.sh gpu
python benchmarks/fidelity/run_study.py --teacher "$OUT/teacher" --recipe small_wan --data "$OUT/data" \
  --out "${RESULTS:-benchmarks/fidelity/results/gpu}" --jobs "${JOBS:-9}" --steps "${STEPS:-400}" "$@"
