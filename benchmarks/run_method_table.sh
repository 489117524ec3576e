#!/usr/bin/env bash
# The Fashion-MNIST method table: every method distilled from one trained standard teacher.
#   benchmarks/run_method_table.sh TEACHER_CKPT OUT_DIR [extra overrides, e.g. --distill.epochs 5]
set -euo pipefail
teacher=$1; out=$2; shift 2
mkdir -p "$out"
cd "$(dirname "$0")/.."
declare -A configs=(
  [nonn_k2]=configs/fashion_mnist/standard.yaml
  [kd]=configs/fashion_mnist/baselines/kd.yaml
  [scratch]=configs/fashion_mnist/baselines/scratch.yaml
  [nonn_random]=configs/fashion_mnist/baselines/nonn_random.yaml
  [nonn_k4]=configs/fashion_mnist/baselines/nonn_k4.yaml
  [nonn_prototype]=configs/fashion_mnist/baselines/nonn_prototype.yaml
  [at]=configs/fashion_mnist/baselines/at.yaml
  [nonn_k2_dropout]=configs/fashion_mnist/baselines/nonn_k2_dropout.yaml
  [nonn_k4_dropout]=configs/fashion_mnist/baselines/nonn_k4_dropout.yaml
)
for name in nonn_k2 kd scratch nonn_random nonn_k4 nonn_prototype at nonn_k2_dropout nonn_k4_dropout; do
  start=$(date +%s)
  .venv/bin/nonn run --config "${configs[$name]}" --run-dir "$out/$name" --teacher.checkpoint "$teacher" \
    --trainer.progress_bar false "$@" > "$out/$name.log" 2>&1 || echo "$name failed, see $out/$name.log"
  echo "$name done in $(( $(date +%s) - start )) s"
done
