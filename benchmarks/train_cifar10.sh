#!/usr/bin/env bash
# Train the CIFAR-10 attack checkpoints (BadNets, Blended, WaNet, SIG), then test each; prints wall time and metrics.
# Usage: bash benchmarks/train_cifar10.sh [attack ...]   (default: all four). Logs in runs/logs/.
# EPOCHS=8 overrides the configs' 12 epochs.
set -euo pipefail
export WANDB_MODE="${WANDB_MODE:-offline}"
mkdir -p runs/logs
for attack in "${@:-badnets blended wanet sig}"; do
  for name in $attack; do
    start=$(date +%s)
    lightning-backdoor fit --config configs/cifar10/base.yaml --config "configs/cifar10/$name.yaml" \
      --trainer.enable_progress_bar=false ${EPOCHS:+--trainer.max_epochs=$EPOCHS} > "runs/logs/fit-$name.log" 2>&1
    echo "$name: fit wall time $(( $(date +%s) - start )) s"
    lightning-backdoor test --config configs/cifar10/base.yaml --config "configs/cifar10/$name.yaml" \
      --ckpt_path "runs/cifar10-$name/checkpoints/poisoned.ckpt" --trainer.logger=false \
      --trainer.default_root_dir "runs/cifar10-$name/test" --trainer.enable_progress_bar=false \
      2>&1 | tee "runs/logs/test-$name.log" | grep -E "test/(clean_acc|asr|robust_acc|target_acc)"
  done
done
