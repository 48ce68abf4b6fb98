"""Ablation: what the repair step would do if it always fired, on the trained CIFAR-10 checkpoints.

Pins the unseen target-class keys at each weight (0 = no repair) regardless of the repair trigger, and prints the
change of clean accuracy, ASR minus its floor and target-class accuracy on the held-out unseen images (the unseen
split minus the images the defense used; the test set is never loaded). Mean of the seeds.

    python benchmarks/forced_repair.py --cases blended:1 blended:10 wanet:1 badnets:1 --weights 0 4 16 64 256
"""

from __future__ import annotations

import argparse
import copy
import statistics

from lightning_backdoor.data.poisoning import apply_trigger, to_float
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.evaluation import evaluate
from lightning_backdoor.runs import instantiate_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["blended:1", "blended:10", "wanet:1", "badnets:1"],
                        help="attack:images_per_class")
    parser.add_argument("--weights", nargs="+", type=float, default=[0, 4, 16, 64, 256])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--layer", default="blocks.2.conv2")
    args = parser.parse_args()
    for case in args.cases:
        attack, budget = case.split(":")
        module, data = instantiate_run(["configs/cifar10/base.yaml", f"configs/cifar10/{attack}.yaml"],
                                       f"runs/cifar10-{attack}/checkpoints/poisoned.ckpt")
        network = module.net.float().eval()
        for weight in args.weights:
            changes = []
            for seed in args.seeds:
                unseen, held = data.unseen_set(int(budget), seed), data.held_out_unseen_set(int(budget), seed)
                held_out = (held.images, held.labels, apply_trigger(data.trigger, held.images),
                            data.attack_labels(held.labels))
                model = copy.deepcopy(network)
                defense = ActivationEditing(layer=args.layer, repair=weight > 0, repair_tolerance=-1.0,  # always fires
                                            repair_weights=(weight,), seed=seed)
                defense.defend(model, UnseenData(to_float(unseen.images), unseen.labels),
                               BackdoorKnowledge.of(data.trigger, data.target_class))
                before = evaluate(network, *held_out, data.num_classes, data.target_class)
                after = evaluate(model, *held_out, data.num_classes, data.target_class)
                changes.append((100 * (after["clean_acc"] - before["clean_acc"]),
                                100 * (after["asr"] - after["asr_floor"]),
                                100 * (after["target_acc"] - before["target_acc"])))
            ca, gap, ta = (statistics.mean(column) for column in zip(*changes))
            print(f"{attack} {budget}/class repair weight {weight:g}: held-out ΔCA {ca:+.2f}  ASR − floor {gap:+.2f}  "
                  f"ΔTA {ta:+.2f}", flush=True)


if __name__ == "__main__":
    main()
