"""Which layers of a model trained elsewhere the edit works at: each layer edited with the trigger known, scored on
held-out clean images the trainer never used (``RUN/heldout/``, written by ``train_foreign.py --heldout_per_class``),
never on the test split.

For every layer (default: the last ``--last`` editable ones) and strength, a copy of the model is edited with the
first ``--per_class`` images per class of ``RUN/unseen/`` (repair on, as ``defend`` runs it) and CA, ASR, the ASR
floor and TA are measured on ``RUN/heldout/`` (%). ``auto`` runs ``layer: auto`` with its default candidates.
``--uncorrected`` edits as if no block added a layer's output to a skip path (no residual correction), to measure
what the correction gives.

    python benchmarks/foreign_model/edit_layers.py --config configs/foreign/cifar10_mobilenet_v3_small.yaml \\
        --run runs/foreign-mobilenet --last 12 --strengths 10 --out runs/foreign-mobilenet/edit_layers.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

from unittest import mock

import torch

from lightning_backdoor.cli import first_per_class
from lightning_backdoor.data import read_image_folder
from lightning_backdoor.data.poisoning import apply_trigger, attack_labels
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.activations import editable_layers
from lightning_backdoor.evaluation import evaluate
from lightning_backdoor.io import atomic_json
from lightning_backdoor.runs import instantiate_run

METRICS = ("clean_acc", "asr", "asr_floor", "target_acc")


def percent(metrics: dict) -> dict[str, float]:
    """The metrics of :data:`METRICS` in %, rounded to 0.01."""
    return {name: round(100 * metrics[name], 2) for name in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/foreign/cifar10_mobilenet_v3_small.yaml")
    parser.add_argument("--run", default="runs/foreign-mobilenet", help="holds weights.pt, unseen/ and heldout/")
    parser.add_argument("--layers", nargs="+", default=None, help="layer names or 'auto' (default: the last --last)")
    parser.add_argument("--last", type=int, default=12)
    parser.add_argument("--strengths", nargs="+", type=float, default=[10.0], help="λ; 0 means strength=null (CV)")
    parser.add_argument("--per_class", type=int, default=10, help="unseen images per class the edit uses")
    parser.add_argument("--uncorrected", action="store_true", help="no residual correction (ablation)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    module, data = instantiate_run([args.config], run / "weights.pt")
    network = module.net.float().eval()
    unseen = first_per_class(read_image_folder(run / "unseen"), args.per_class, str(run / "unseen"))
    heldout = read_image_folder(run / "heldout", classes=unseen.classes)
    images, labels = unseen.images.float() / 255, unseen.labels
    held_out = (heldout.images, heldout.labels, apply_trigger(data.trigger, heldout.images),  # uint8
                attack_labels(heldout.labels, data.target_class, False, len(unseen.classes)), len(unseen.classes),
                data.target_class)
    knowledge = BackdoorKnowledge.of(data.trigger, data.target_class)
    before = percent(evaluate(network, *held_out))
    print(f"before, {len(heldout.labels)} held-out images: {before}", flush=True)
    rows = []
    for layer in args.layers or editable_layers(network)[-args.last:]:
        for strength in args.strengths:
            model = copy.deepcopy(network)
            started = time.perf_counter()
            with (mock.patch("lightning_backdoor.defenses.activations.residual_branch_of", lambda *_: None)
                  if args.uncorrected else contextlib.nullcontext()):
                result = ActivationEditing(layer=layer, strength=strength or None).defend(
                    model, UnseenData(images, labels), knowledge)
            seconds = time.perf_counter() - started
            after = percent(evaluate(model, *held_out))
            row = {"layer": layer, "edited": result.layer, "corrected": not args.uncorrected,
                   "strength": result.details["strength"], "repaired": result.repaired, "seconds": round(seconds, 2),
                   "after": after,
                   "asr_minus_floor": round(after["asr"] - after["asr_floor"], 2),
                   "ca_drop": round(before["clean_acc"] - after["clean_acc"], 2),
                   "ta_drop": round(before["target_acc"] - after["target_acc"], 2)}
            rows.append(row)
            print(f"{layer} λ={strength or 'cv'} ({result.layer}, λ={row['strength']}, repaired {result.repaired}): "
                  f"ASR {after['asr']:.2f} (floor {after['asr_floor']:.2f}, gap {row['asr_minus_floor']:+.2f}), "
                  f"CA drop {row['ca_drop']:+.2f}, TA drop {row['ta_drop']:+.2f}, {seconds:.1f} s", flush=True)
    if args.out:
        atomic_json({"before": before, "rows": rows, "per_class": args.per_class, "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "config": args.config, "run": str(run),
                     "uncorrected": args.uncorrected}, args.out)


if __name__ == "__main__":
    main()
