#!/usr/bin/env bash
# Defend trained models with `lightning-backdoor defend` on the Trainer's device (ACCELERATOR, default gpu), on the
# machine lent for minutes, after train.sh or on a carried checkpoint; each defense_report.json comes back.
# Settings (environment):
#   DEFEND    "name|checkpoint|config config ...|extra options" entries separated by ';' (the configs as for fit;
#             the extra options go to defend as they are, e.g. --data.init_args.unseen_per_class=250)
#   BUDGETS   unseen images per class, trigger known (default "10 1"); UNKNOWN the budget with the trigger
#             unknown (default 10; empty: none)
#   OUT       where reports-<TAG>.tar.gz and the logs go (default /tmp/gpuout); TAG names the tarball (default defend)
#   CARRY     as in train.sh: CIFAR-10 packed, wheels installed where missing
# Prints, per defense, its wall time (process start to exit: loading, the defense, the test evaluations before and
# after) and the report's summary: device, layer, seconds of the defense, CA/ASR/TA before and after.
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT="${OUT:-/tmp/gpuout}"; mkdir -p "$OUT"; TAG="${TAG:-defend}"
CARRY="${CARRY:-.gpu}"; HERE=benchmarks/gpu_budget; ACCELERATOR="${ACCELERATOR:-gpu}"
BUDGETS="${BUDGETS:-10 1}"; UNKNOWN="${UNKNOWN-10}"
if [[ -d "$CARRY"/whl ]] && ! python3 -c "import jsonargparse" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD:$PWD/$HERE:${PYTHONPATH:-}"
[[ -d /tmp/cifar10/train ]] || python3 $HERE/unpack_data.py "$CARRY" /tmp/cifar10 || exit 6
reports=/tmp/reports-$TAG; rm -rf "$reports"; mkdir -p "$reports" /tmp/logs
IFS=';' read -ra entries <<< "${DEFEND:?DEFEND names what to defend}"
for entry in "${entries[@]}"; do
  IFS='|' read -r name checkpoint configs extra <<< "$entry"
  name=$(echo $name)
  config_args=(); for c in $configs; do config_args+=(--config "$c"); done
  for run in $(for b in $BUDGETS; do echo "known:$b"; done) ${UNKNOWN:+unknown:$UNKNOWN}; do
    kind=${run%%:*}; budget=${run#*:}; label=$name-$kind-k$budget
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    python3 -c 'from lightning_backdoor.cli import main; main()' defend "${config_args[@]}" --config $HERE/defend.yaml \
      --checkpoint "$checkpoint" --unseen_per_class "$budget" \
      --trigger_known "$([[ $kind == known ]] && echo true || echo false)" \
      --output_dir "/tmp/defended/$label" --trainer.accelerator "$ACCELERATOR" $extra \
      > "/tmp/logs/defend-$label.log" 2>&1
    status=$?
    echo "$label: exit $status, $(python3 -c "import time; print(f'{time.time() - $start:.1f}')") s wall"
    if [[ $status == 0 ]]; then
      cp "/tmp/defended/$label/defense_report.json" "$reports/$label.json"
      python3 $HERE/summary.py "$reports/$label.json"
    else
      tail -n 15 "/tmp/logs/defend-$label.log"
    fi
  done
done
tar czf "$OUT/reports-$TAG.tar.gz" -C /tmp "reports-$TAG" logs
