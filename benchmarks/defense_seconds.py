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

``--compare_whole`` also times the same defense with whole held-out passes (the shortcut of
:mod:`lightning_backdoor.defenses.suffix` turned off), in alternating pairs with it on, and checks that both edit
the same layer with the same weights. ``--strength null`` chooses λ on U as well (18 options instead of 3).
``--bf16`` times the defense and its floor under bfloat16 autocast (fast only where the CPU computes it natively:
``environment.native_bf16`` in the output).
"""

from __future__ import annotations

import argparse
import copy
from contextlib import contextmanager
from pathlib import Path

import torch
from edit_cost import forward_floor, paired_seconds

from lightning_backdoor.data.poisoning import apply_trigger, to_float
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.suffix import SuffixPasses
from lightning_backdoor.io import atomic_json
from lightning_backdoor.models import build_model
from lightning_backdoor.provenance import environment
from lightning_backdoor.runs import instantiate_run, run_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--run", default="runs/cifar10-badnets-u250", help="a CIFAR-10 BadNets run (its unseen split)")
    parser.add_argument("--unseen_per_class", type=int, default=250, help="the run's unseen split per class")
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strength", type=lambda text: None if text == "null" else float(text), default=10.0,
                        help="λ, or null: chosen on U")
    parser.add_argument("--bf16", action="store_true",
                        help="the defense and its floor under bfloat16 autocast (ActivationEditing(bf16=True))")
    parser.add_argument("--compare_whole", action="store_true",
                        help="also time the defense with whole held-out passes, paired with the shortcut on")
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
        copies = iter([copy.deepcopy(network) for _ in range(3 * args.repeats + 6)])  # one per call, made beforehand
        defense = ActivationEditing(layer="auto", strength=args.strength, seed=0, bf16=args.bf16)
        defend = lambda: defense.defend(next(copies), unseen, knowledge)  # noqa: E731
        timing = paired_seconds(defend, lambda: forward_floor(network, unseen.images, triggered, args.bf16), args.repeats)
        details = defend().details
        seconds, floor = timing["seconds"], timing["floor_seconds"]
        row = {"unseen_per_class": budget, "strength": args.strength, "bf16": args.bf16, **timing, "views": details["views"],
               "system": details["system"], "held_out_passes": details["held_out_passes"],
               "candidates": sorted({option.split(" ")[0]
                                     for option in details["selection"]["cross_validated_loss_on_unseen"]})}
        line = f"{args.model}, {budget} per class: {seconds:.2f} s (floor {floor:.2f} s)"
        if args.compare_whole:
            versus = paired_seconds(defend, lambda: whole_passes(defend), args.repeats)
            row["versus_whole"] = versus
            shortcut, whole = copy.deepcopy(network), copy.deepcopy(network)
            chosen = defense.defend(shortcut, unseen, knowledge)
            reference = whole_passes(lambda: defense.defend(whole, unseen, knowledge))
            row["same_edit"] = chosen.layer == reference.layer and all(
                torch.equal(value, whole.state_dict()[name]) for name, value in shortcut.state_dict().items())
            line += (f"; whole held-out passes {versus['floor_seconds']:.2f} s against {versus['seconds']:.2f} s "
                     f"(x{1 / versus['ratio']:.2f}), the same edit: {row['same_edit']}")
        rows.append(row)
        print(f"{line}; held-out passes: {row['held_out_passes']}, candidates {row['candidates']}, {row['system']}",
              flush=True)
    atomic_json({"model": args.model, "environment": environment(), "rows": rows}, Path(args.out))


@contextmanager
def shortcut_off():
    """Whole held-out passes inside (as if the model could not be traced)."""
    build = SuffixPasses._build

    def whole(self: SuffixPasses, layers: list[str]) -> None:
        self.reason = "turned off by the benchmark"
    SuffixPasses._build = whole
    try:
        yield
    finally:
        SuffixPasses._build = build


def whole_passes(call):
    """``call()`` with the held-out passes' shortcut turned off."""
    with shortcut_off():
        return call()


if __name__ == "__main__":
    main()
