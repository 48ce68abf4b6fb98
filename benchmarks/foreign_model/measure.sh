#!/usr/bin/env bash
# Defend the foreign ResNet-18 (train_foreign.py) with the defender's own 5 clean images per class: trigger known,
# trigger unknown, and without the model's normalisation; each command timed whole (its report has the defense's
# own seconds).
#   python benchmarks/foreign_model/train_foreign.py --out runs/foreign --epochs 10
#   bash benchmarks/foreign_model/measure.sh runs/foreign
set -uo pipefail
RUN=${1:-runs/foreign}
COMMON=(--config configs/foreign/cifar10_resnet18.yaml --checkpoint "$RUN/weights.pt" --unseen_root "$RUN/unseen")
timed() { local name=$1; shift; local start=$(date +%s.%N)
  lightning-backdoor defend "${COMMON[@]}" --output_dir "$RUN/$name" "$@" 2>&1 | grep -v "trigger estimation" | tail -4
  echo "$name: whole command $(echo "$(date +%s.%N) - $start" | bc) s"; }
timed known
timed unknown --trigger_known false
timed no_normalize --model.init_args.normalize null
timed no_normalize_forced --model.init_args.normalize null --accept_low_accuracy true
