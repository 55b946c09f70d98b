#!/usr/bin/env bash
# One node: QVGen QAT distillation with torchrun (all GPUs of the node, or CPU processes with gloo).
#   launch/torchrun_node.sh RECIPE [--init-from CKPT] [--section.field value ...]
# Environment: GPUS (default: all visible GPUs, or 2 CPU processes), ENV_FILE (sourced first, e.g. launch/env/h100.env).
set -euo pipefail
RECIPE=${1:?usage: launch/torchrun_node.sh RECIPE [args...]}
shift
[ -n "${ENV_FILE:-}" ] && . "$ENV_FILE"
if [ -z "${GPUS:-}" ]; then
  GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
exec torchrun --standalone --nproc-per-node "$GPUS" -m megatron_qvgen.train --recipe "$RECIPE" "$@"
