#!/usr/bin/env bash
# The main job on a fresh CPU machine: set-up, a tiny full-precision teacher fitted on synthetic latent shards
# (both made if missing), then QVGen W4A4 QAT distillation of the tiny Wan recipe at TP=2 with rank decay to
# r = 0, a progress bar, TensorBoard logs and a final checkpoint. Extra arguments override config fields.
# Another run needs its own output folder (a run directory refuses a changed model or quantization):
#   OUT_DIR=outputs/tiny_wan_w3 bash scripts/demo.sh --quant.weight_bits 3 --quant.act_bits 3
# The same run, continued for more steps (the lr schedule follows the new length):
#   bash scripts/demo.sh --train.steps 120
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
OUT=${OUT_DIR:-outputs/tiny_wan}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ ! -f "$OUT/teacher/qvgen_complete" ]; then
  torchrun --standalone --nproc-per-node 1 -m megatron_qvgen.fit_teacher --recipe tiny_wan --out "$OUT/teacher" \
    --steps 300 --data.shards "$OUT/data" --data.synthesize_if_missing true
fi
torchrun --standalone --nproc-per-node "$NPROC" -m megatron_qvgen.train --recipe tiny_wan --init-from "$OUT/teacher" \
  --data.shards "$OUT/data" --data.synthesize_if_missing true --parallel.tensor_parallel "$NPROC" \
  --train.steps 60 --train.lr 1e-4 --train.aux_lr 1e-4 --train.log_interval 10 --train.image_interval 20 \
  --train.eval_interval 10 --train.save_interval 20 \
  --train.save_dir "$OUT/checkpoints" --train.tensorboard_dir "$OUT/tensorboard" "$@"
echo "done: final checkpoint $OUT/checkpoints/$(cat "$OUT/checkpoints/latest" 2>/dev/null); TensorBoard: tensorboard --logdir $OUT/tensorboard"
# The verdict: the trained student against the teacher quantized without training (PTQ), sampled from the same
# noise and text (python -m megatron_qvgen.evaluate; JSON and PNG grids in $OUT/eval).
python -m megatron_qvgen.evaluate --teacher "$OUT/teacher" --student ptq --recipe tiny_wan --json "$OUT/eval/ptq.json" \
  --data.shards "$OUT/data" "$@" > /dev/null
python -m megatron_qvgen.evaluate --teacher "$OUT/teacher" --student "$OUT/checkpoints" --json "$OUT/eval/trained.json" \
  --data.shards "$OUT/data" "$@" > /dev/null
python -m megatron_qvgen.fidelity.report "$OUT/eval/ptq.json" "$OUT/eval/trained.json" --labels "PTQ (no training)" "QAT student"
