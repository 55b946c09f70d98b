#!/usr/bin/env bash
# One node: QVGen QAT distillation with torchrun (all GPUs of the node, or CPU processes with gloo).
#   launch/torchrun_node.sh RECIPE [--init-from CKPT] [--section.field value ...]
# Environment: GPUS (default: all visible GPUs, or 2 CPU processes), ENV_FILE (sourced first, e.g. env/h100.env;
# a relative path is relative to this script's folder).
# A run stopped by a signal or train.exit_after_minutes exits 75 on every rank, which torchrun reports as a
# worker failure (its own status 1); rank 0's last line says "qvgen: stopped to be requeued ...". Run the same
# command again to continue. On SLURM use launch/slurm_wan14b.sbatch, which sees the ranks' own status.
set -euo pipefail
RECIPE=${1:?usage: launch/torchrun_node.sh RECIPE [args...]}
shift
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -n "${ENV_FILE:-}" ]; then
  case "$ENV_FILE" in /*) ;; *) ENV_FILE=$SCRIPT_DIR/$ENV_FILE ;; esac
  . "$ENV_FILE"
fi
if [ -z "${GPUS:-}" ]; then
  GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
exec torchrun --standalone --nproc-per-node "$GPUS" -m megatron_qvgen.train --recipe "$RECIPE" "$@"
