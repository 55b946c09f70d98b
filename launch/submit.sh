#!/usr/bin/env bash
# Submit a batch script of launch/ from any directory: SLURM opens #SBATCH --output (launch/logs/...) relative to
# the directory sbatch runs in, before the script starts, so sbatch must run from the repository root.
#   launch/submit.sh [sbatch options] launch/slurm_wan14b.sbatch [training arguments, absolute paths]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p launch/logs
exec sbatch "$@"
