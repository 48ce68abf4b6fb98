"""Seconds of the default defense (``ActivationEditing(layer="auto")``: λ = 10, repair on) on a registry model with
freshly initialised weights, against its floor (one clean and one triggered forward pass over U), with 1 and 10
unseen CIFAR-10 images per class and the BadNets trigger known. Seconds depend on the shapes, not on the weights:
the same layers are cross-validated whatever their values (a repair that fires on a trained model adds its trials).

    python benchmarks/defense_seconds.py --model preact_resnet18 --out runs/bench/defense-seconds/preact_resnet18.json

Unseen images come from the run of ``--run`` (its data module's unseen split, seed 0). The defense and its floor are
timed in alternating pairs (``edit_cost.paired_seconds``: medians of ``--repeats`` pairs after a warm-up, the ratio
the median of the pairs'); each defense gets a copy of the network made before the clock starts. With one image per
class the defense reads 4 views of each (``min_images`` 40) where the floor reads the 10 images once. Needs an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from edit_cost import forward_floor, paired_seconds

from lightning_backdoor.data.poisoning import apply_trigger, to_float
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.io import atomic_json
from lightning_backdoor.models import build_model
from lightning_backdoor.runs import instantiate_run, run_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--run", default="runs/cifar10-badnets-u250", help="a CIFAR-10 BadNets run (its unseen split)")
    parser.add_argument("--unseen_per_class", type=int, default=250, help="the run's unseen split per class")
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/defense-seconds/preact_resnet18.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"--data.init_args.unseen_per_class={args.unseen_per_class}"]
    _, data = instantiate_run(["configs/cifar10/base.yaml", "configs/cifar10/badnets.yaml"],
                              run_checkpoint(Path(args.run)), overrides)
    knowledge = BackdoorKnowledge.of(data.trigger, data.target_class)
    torch.manual_seed(0)
    network = build_model(args.model, num_classes=data.num_classes, in_channels=3).float().eval()
    rows = []
    for budget in args.budgets:
        unseen_set = data.unseen_set(budget, 0)
        unseen = UnseenData(to_float(unseen_set.images), unseen_set.labels)
        triggered = to_float(apply_trigger(data.trigger, unseen_set.images))
        copies = iter([copy.deepcopy(network) for _ in range(args.repeats + 2)])  # one per call, made beforehand
        defend = lambda: ActivationEditing(layer="auto", seed=0).defend(next(copies), unseen, knowledge)  # noqa: E731
        timing = paired_seconds(defend, lambda: forward_floor(network, unseen.images, triggered, False), args.repeats)
        details = defend().details
        seconds, floor = timing["seconds"], timing["floor_seconds"]
        row = {"unseen_per_class": budget, **timing, "views": details["views"],
               "system": details["system"],
               "candidates": [option.split(" ")[0]
                              for option in details["selection"]["cross_validated_loss_on_unseen"]]}
        rows.append(row)
        print(f"{args.model}, {budget} per class: {seconds:.2f} s (floor {floor:.2f} s), candidates "
              f"{row['candidates']}, {row['system']}", flush=True)
    atomic_json({"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows},
                Path(args.out))


if __name__ == "__main__":
    main()
