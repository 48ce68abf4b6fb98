#!/usr/bin/env bash
# Train several CIFAR-10 runs at once on one GPU for as many epochs as TRAIN_BUDGET seconds allow, on a machine
# lent for minutes (how the PreAct-ResNet18 and VGG-16-BN models of docs/results/preact-resnet18.md were made).
#   1. a probe trains every job together for PROBE_STEPS steps and times a step (steptimer.py);
#   2. epochs = what fits the budget (at most MAX_EPOCHS) for the slowest job (its step time x its batches per
#      epoch: jobs may differ in batch size), the schedule set for that many; max_time stops a run that overruns;
#   3. each checkpoint is shrunk for the trip back (pack.py: fp16 weights, no optimizer state, 15 MiB parts); on
#      the CPU, unpack.py rebuilds a float32 Lightning checkpoint that `defend` and the benchmarks load.
# The GPU machine has no W&B and no data: device.yaml turns the logger and the fit-end defense off (the defense
# runs on the CPU afterwards), and CIFAR-10 travels as one file (pack_data.py; unpack_data.py rebuilds the same
# ImageFolder tree, byte for byte). Missing packages travel as wheels in $CARRY/whl.
# Settings (environment):
#   CARRY         folder carried to the GPU machine (default .gpu): cifar10.bin + cifar10.idx from
#                 `python benchmarks/gpu_budget/pack_data.py ../shared/data/cifar10 .gpu`, and optionally whl/ with
#                 wheels of jsonargparse, omegaconf, docstring_parser, typeshed_client, antlr4-python3-runtime
#                 (installed when jsonargparse is missing there)
#   JOBS          "attack:model_config ..." (attack = a configs/cifar10/<attack>.yaml)
#   TRAIN_BUDGET  seconds of training for all jobs together (default 300); MAX_EPOCHS caps the epochs (100)
#   PROBE_STEPS   steps of the probe (110); STEP_WINDOW="first,last" steps it times (30,110): last <= PROBE_STEPS
#   MAX_MINUTES   Lightning's max_time per run (default (TRAIN_BUDGET + 90) / 60)
#   OUT           where the packed checkpoints and logs.tar.gz go; RUNS the run folders (/tmp/gpuruns);
#                 LIMIT=n limits the training batches per epoch (a smoke run on a CPU)
# It uses (and empties) /tmp/logs, /tmp/probe-* and /tmp/cifar10 on that machine. Back here, per run:
#   python benchmarks/gpu_budget/unpack.py $OUT preact_resnet18-badnets \
#     runs/gpu/preact_resnet18-badnets/checkpoints/poisoned.ckpt
#   JOBS="badnets:configs/cifar10/preact_resnet18.yaml blended:configs/cifar10/preact_resnet18.yaml" \
#     TRAIN_BUDGET=330 OUT=/tmp/out bash benchmarks/gpu_budget/train.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT="${OUT:-/tmp/gpuout}"; mkdir -p "$OUT"
TRAIN_BUDGET="${TRAIN_BUDGET:-300}"; PROBE_STEPS="${PROBE_STEPS:-110}"; MAX_EPOCHS="${MAX_EPOCHS:-100}"
CARRY="${CARRY:-.gpu}"; HERE=benchmarks/gpu_budget
RUNS="${RUNS:-/tmp/gpuruns}"; rm -rf /tmp/probe-* /tmp/logs; mkdir -p "$RUNS" /tmp/logs
T0=$SECONDS
if [[ -d "$CARRY"/whl ]] && ! python3 -c "import jsonargparse" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD:$PWD/$HERE:${PYTHONPATH:-}"
[[ -d /tmp/cifar10/train ]] || python3 $HERE/unpack_data.py "$CARRY" /tmp/cifar10 || exit 6
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, lightning, torchmetrics, jsonargparse, omegaconf; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'cuda', torch.cuda.is_available(), 'threads', torch.get_num_threads())" || exit 4
fit() {
  local attack=$1 model=$2; shift 2
  python3 -c 'from lightning_backdoor.cli import main; main()' fit --config configs/cifar10/base.yaml \
    --config "configs/cifar10/$attack.yaml" --config "$model" --config $HERE/device.yaml "$@"
}
# probe: every job at once, as in the real run
JOBS="${JOBS:-badnets:configs/cifar10/preact_resnet18.yaml blended:configs/cifar10/preact_resnet18.yaml}"
for job in $JOBS; do
  attack=${job%%:*}; MODEL=${job#*:}; name=$(basename "$MODEL" .yaml)-$attack
  fit $attack "$MODEL" --trainer.max_steps="$PROBE_STEPS" --trainer.limit_val_batches=0 --trainer.default_root_dir="/tmp/probe-$name" \
    ${LIMIT:+--trainer.limit_train_batches=$LIMIT} > "/tmp/logs/probe-$name.log" 2>&1 &
done
wait
echo "probe done at $((SECONDS - T0)) s"
# each job's epoch = its step time x its batches (jobs may differ in batch size); the slowest job sets the epochs
epochs_s=$(for log in /tmp/logs/probe-*.log; do
  awk '/^STEP_SECONDS/ {s = $2} /^TRAIN_BATCHES/ {b = $2} END {if (s && b) print s * b; else print "missing"}' "$log"
done)
if [[ -z "$epochs_s" || "$epochs_s" == *missing* ]]; then tail -n 30 /tmp/logs/probe-*.log; exit 5; fi
epoch=$(sort -g <<< "$epochs_s" | tail -1)
epochs=$(python3 -c "e = int(($TRAIN_BUDGET - 25) / ($epoch * 1.05 + 1.0)); print(max(1, min($MAX_EPOCHS, e)))")
echo "slowest job's epoch ${epoch}s -> $epochs epochs in a ${TRAIN_BUDGET}s budget"
for job in $JOBS; do
  attack=${job%%:*}; MODEL=${job#*:}; name=$(basename "$MODEL" .yaml)-$attack
  fit $attack "$MODEL" --trainer.max_epochs="$epochs" --trainer.default_root_dir="$RUNS/$name" \
    --trainer.max_time=$(printf "00:00:%02d:00" "${MAX_MINUTES:-$(( (TRAIN_BUDGET + 90) / 60 ))}") ${LIMIT:+--trainer.limit_train_batches=$LIMIT} \
    > "/tmp/logs/fit-$name.log" 2>&1 &
done
wait
echo "training done at $((SECONDS - T0)) s"
for job in $JOBS; do
  attack=${job%%:*}; MODEL=${job#*:}; name=$(basename "$MODEL" .yaml)-$attack
  grep -h EPOCH "/tmp/logs/fit-$name.log" | tail -3
  python3 $HERE/pack.py "$RUNS/$name/checkpoints/poisoned.ckpt" "$OUT/$name.ckpt" || tail -n 40 "/tmp/logs/fit-$name.log"
done
tar czf "$OUT/logs.tar.gz" -C /tmp logs
echo "all done at $((SECONDS - T0)) s"
