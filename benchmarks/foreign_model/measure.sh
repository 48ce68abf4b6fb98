#!/usr/bin/env bash
# Defend a foreign model (train_foreign.py) with the defender's own clean images (RUN/unseen): each row one `defend`
# command, timed whole (its report has the defense's own seconds).
#   bash benchmarks/foreign_model/measure.sh RUN [CONFIG [ROW ...]]
# Rows: known (trigger known, the config's defaults), known_1 (1 image per class), known_cv (λ chosen on U),
# unknown (--trigger_known false), unknown_cv (and λ chosen on U), unknown_image_space (the image-space estimators
# only), no_normalize and no_normalize_forced (without the model's normalisation).
# Default: the ResNet-18 config and the rows known unknown no_normalize no_normalize_forced.
#   python benchmarks/foreign_model/train_foreign.py --out runs/foreign --epochs 10
#   bash benchmarks/foreign_model/measure.sh runs/foreign
#   bash benchmarks/foreign_model/measure.sh runs/foreign-mobilenet configs/foreign/cifar10_mobilenet_v3_small.yaml \
#       known known_1 unknown
set -uo pipefail
RUN=${1:-runs/foreign}
CONFIG=${2:-configs/foreign/cifar10_resnet18.yaml}
ROWS=("${@:3}")
[ ${#ROWS[@]} -eq 0 ] && ROWS=(known unknown no_normalize no_normalize_forced)
COMMON=(--config "$CONFIG" --checkpoint "$RUN/weights.pt" --unseen_root "$RUN/unseen")
timed() { local name=$1; shift; local start=$(date +%s.%N)
  lightning-backdoor defend "${COMMON[@]}" --output_dir "$RUN/$name" "$@" 2>&1 | grep -v "trigger estimation" | tail -4
  echo "$name: whole command $(echo "$(date +%s.%N) - $start" | bc) s"; }
for row in "${ROWS[@]}"; do
  case $row in
    known) timed known ;;
    known_1) timed known_1 --unseen_per_class 1 ;;
    known_cv) timed known_cv --defense.init_args.strength=null ;;
    unknown) timed unknown --trigger_known false ;;
    unknown_cv) timed unknown_cv --trigger_known false --defense.init_args.strength=null ;;
    unknown_image_space) timed unknown_image_space --defense=EstimateFirst --defense.defense=ActivationEditing \
      --defense.estimator=TriggerEstimator '--defense.estimator.estimators=[neural_cleanse,blend,perturbation,warp]' ;;
    no_normalize) timed no_normalize --model.init_args.normalize null ;;
    no_normalize_forced) timed no_normalize_forced --model.init_args.normalize null --accept_low_accuracy true ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
done
