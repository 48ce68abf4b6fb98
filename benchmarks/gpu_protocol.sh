#!/usr/bin/env bash
# The GPU protocol: PreAct-ResNet18 (width 1.0) with BackdoorBench's training settings (100 epochs, SGD lr 0.01,
# cosine, batch 128, 10 % poison, target 0; configs/cifar10/preact_resnet18.yaml) on BadNets, Blended, WaNet and
# SIG, then the same tables as for the compact net:
#   1. every attack trained (fit's own end-of-training defense report lands in the run folder);
#   2. the defense, trigger known, with 1, 5 and 10 unseen images per class over the seeds
#      (benchmarks/defense_cifar10.py: CA/ASR/TA before and after, ASR floor, seconds);
#   3. the defense, trigger unknown, 10 per class (benchmarks/estimate_cifar10.py: target found?, ASR − floor,
#      CA drop, seconds), the clean model included when CLEAN=1.
# CIFAR-10 is read from ../shared/data/cifar10 (configs/cifar10/base.yaml); DATA_ROOT=<ImageFolder copy with
# train/ and test/> points elsewhere. A stage that fails names its log.
# Usage, on a machine with a GPU, from the repository root:
#   bash benchmarks/gpu_protocol.sh                       # everything (100 epochs per attack)
#   EPOCHS=30 ATTACKS="badnets blended" bash benchmarks/gpu_protocol.sh
#   EPOCHS=1 LIMIT_BATCHES=2 SEEDS=0 ATTACKS=badnets OUT=/tmp/gp bash benchmarks/gpu_protocol.sh  # smoke run, CPU
# DEVICE (default: cuda where torch sees one, else cpu) is where the defense benchmarks run.
# Everything goes under $OUT (default runs/gpu): runs, logs, tables (*.md) and rows (*.json); a run that already
# has its checkpoint is not retrained. Prints each stage's wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"
OUT="${OUT:-runs/gpu}"
EPOCHS="${EPOCHS:-100}"
ATTACKS="${ATTACKS:-badnets blended wanet sig}"
SEEDS="${SEEDS:-0 1 2}"
MODEL_CONFIG="${MODEL_CONFIG:-configs/cifar10/preact_resnet18.yaml}"
# the defense benchmarks run where the training did: the GPU when there is one
DEVICE="${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
name="$(basename "$MODEL_CONFIG" .yaml)"
mkdir -p "$OUT/logs"
limit=()
if [[ -n "${LIMIT_BATCHES:-}" ]]; then
  limit=(--trainer.limit_train_batches="$LIMIT_BATCHES" --trainer.limit_val_batches="$LIMIT_BATCHES")
  # a smoke run checks the plumbing on a 1/8-width net; its model is at chance, which the fit-end defense refuses
  # unless told otherwise
  sed -e 's/^        unseen_per_class: 10$/&\n        accept_low_accuracy: true/' -e 's/{width: 1.0}/{width: 0.125}/' \
    "$MODEL_CONFIG" > "$OUT/smoke.yaml"
  MODEL_CONFIG="$OUT/smoke.yaml"
fi
python -c "import json; from lightning_backdoor.provenance import environment; print(json.dumps(environment()))" \
  | tee "$OUT/environment.json"
runs=()
extra=() bench_extra=()
if [[ -n "${DATA_ROOT:-}" ]]; then extra=(--data.init_args.root="$DATA_ROOT"); bench_extra=(--data_root "$DATA_ROOT"); fi
clean=""
if [[ "${CLEAN:-0}" == 1 ]]; then clean=clean; fi
trap 'echo "gpu_protocol: a stage failed; see the newest log in $OUT/logs/" >&2' ERR
for attack in $ATTACKS $clean; do
  run="$OUT/$name-$attack"
  runs+=("$attack")
  if [[ -f "$run/checkpoints/poisoned.ckpt" ]]; then echo "$attack: $run is trained, reused"; continue; fi
  start=$SECONDS
  lightning-backdoor fit --config configs/cifar10/base.yaml --config "configs/cifar10/$attack.yaml" \
    --config "$MODEL_CONFIG" --trainer.max_epochs="$EPOCHS" --trainer.default_root_dir="$run" \
    --trainer.enable_progress_bar=false "${limit[@]}" "${extra[@]}" > "$OUT/logs/fit-$attack.log" 2>&1
  echo "$attack: fit $EPOCHS epochs in $((SECONDS - start)) s; $(grep -E "ASR .* -> " "$OUT/logs/fit-$attack.log" | tail -1)"
done
start=$SECONDS
# shellcheck disable=SC2086
python benchmarks/defense_cifar10.py --attacks $ATTACKS --budgets 1 5 10 --seeds $SEEDS --layer auto --device "$DEVICE" \
  --model_config "$MODEL_CONFIG" --runs "$OUT" --run_name "$name-{}" --out "$OUT/known.json" "${bench_extra[@]}" \
  | tee "$OUT/logs/known.log" | grep '^|' > "$OUT/known.md"
echo "trigger known: $((SECONDS - start)) s"; cat "$OUT/known.md"
start=$SECONDS
python benchmarks/estimate_cifar10.py --runs "${runs[@]}" --budget 10 --layer auto --no_progress --device "$DEVICE" \
  --model_config "$MODEL_CONFIG" --root "$OUT" --run_name "$name-{}" --out "$OUT/unknown.json" "${bench_extra[@]}" \
  | tee "$OUT/logs/unknown.log" | grep '^|' > "$OUT/unknown.md"
echo "trigger unknown: $((SECONDS - start)) s"; cat "$OUT/unknown.md"
