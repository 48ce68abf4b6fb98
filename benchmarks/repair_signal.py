"""Choose the repair step on U alone: its signal and the two repairs, on the trained CIFAR-10 checkpoints.

For every case (attack, unseen images per class), edited layer and seed: the edit without repair (``none``), the
repair as the defense runs it (``pin``/``protect``: fired by the cross-fitted signal, its setting chosen by it), or
forced on at one setting (``pin@16``: target keys added to the preserved ones at weight 16; ``protect@0.9``: the edit
kept out of the subspace holding 90 % of the target keys' energy). Prints the signal (drop of the target-class
probability on held-out folds of U) and, on the *held-out* unseen images (the unseen split minus the images the
defense used; the test split is never loaded), ΔCA, ΔTA and ASR minus its floor. Mean of the seeds, one line per
setting; ``--out`` keeps every row as JSON.

Two probes, not defenses, show where a head-layer edit's target-class loss sits: ``target_row@A`` scales the
unrepaired edit's change of the target class's row of the head by A (0: that row left as it was), and
``target_logit@B`` adds B to the target class's logit of the unrepaired edited model (a bias on that class).

    python benchmarks/repair_signal.py --cases blended:1 badnets:1 --layers blocks.2.conv2 head --seeds 0 1 2

A case ``rotation40:B`` is the 40-class model of ``benchmarks/estimation_scaling.py --many_classes`` (CIFAR-10
classes x 4 rotations, 10 % BadNets 3x3 patch to class 0; its weights ``--rotation40``): a data set with many
classes, where the target class is 1/40 of U. Its unseen images are B per class drawn from CIFAR-10's test split
(never trained on) by the seed; the held-out images are the rest of the test split, each turned by its index (about
250 per class).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
# this folder's benchmark (run this file as a script): the 40-class problem
from estimation_scaling import ROTATIONS, rotated, rotated_unseen

from lightning_backdoor.data.poisoning import apply_trigger, attack_labels, to_float
from lightning_backdoor.data.sources import load_source
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.activation_editing import predict_logits
from lightning_backdoor.defenses.activations import get_layer
from lightning_backdoor.evaluation import evaluate
from lightning_backdoor.io import atomic_json
from lightning_backdoor.models import CompactNet
from lightning_backdoor.runs import instantiate_run
from lightning_backdoor.triggers import BadNets

# (images per class, seed) -> the unseen images the defense gets, and the held-out evaluation's arguments
Draw = Callable[[int, int], tuple[UnseenData, tuple[Any, ...]]]


def cifar10_case(attack: str, runs: Path) -> tuple[torch.nn.Module, BackdoorKnowledge, Draw]:
    """A checkpoint of ``benchmarks/train_cifar10.sh``: the network, the attack, and its unseen split's draws."""
    module, data = instantiate_run(["configs/cifar10/base.yaml", f"configs/cifar10/{attack}.yaml"],
                                   runs / f"cifar10-{attack}" / "checkpoints" / "poisoned.ckpt")

    def draw(budget: int, seed: int) -> tuple[UnseenData, tuple[Any, ...]]:
        unseen, held = data.unseen_set(budget, seed), data.held_out_unseen_set(budget, seed)
        return UnseenData(to_float(unseen.images), unseen.labels), (
            held.images, held.labels, apply_trigger(data.trigger, held.images), data.attack_labels(held.labels),
            data.num_classes, data.target_class)

    return module.net.float().eval(), BackdoorKnowledge.of(data.trigger, data.target_class), draw


def rotation40_case(weights: Path, cifar_root: str, cache_dir: str) -> tuple[torch.nn.Module, BackdoorKnowledge, Draw]:
    """The 40-class model (weights only, never pickled code), its 3x3 patch to class 0, and draws from CIFAR-10's
    test split: B images of every (class, rotation) for the defense, the rest for the held-out evaluation."""
    network = CompactNet(num_classes=10 * ROTATIONS, widths=(64, 128, 256))
    network.load_state_dict(torch.load(weights, weights_only=True))
    trigger, target = BadNets(size=3), 0
    _, test = load_source("cifar10", root=cifar_root, cache_dir=cache_dir)

    def draw(budget: int, seed: int) -> tuple[UnseenData, tuple[Any, ...]]:
        images, labels, picked = rotated_unseen(test.images, test.labels, budget, seed)
        rest = torch.ones(len(test.labels), dtype=torch.bool)
        rest[picked] = False
        held, held_labels = rotated(to_float(test.images[rest]), test.labels[rest],
                                    torch.arange(int(rest.sum())) % ROTATIONS)
        attack = attack_labels(held_labels, target, False, 10 * ROTATIONS)
        return UnseenData(images, labels), (held, held_labels, trigger(held), attack, 10 * ROTATIONS, target)

    return network.float().eval(), BackdoorKnowledge.of(trigger, target), draw


PROBES = ("target_row", "target_logit")


def held_out_float(images: torch.Tensor) -> torch.Tensor:
    """The held-out images as float in [0, 1] (the CIFAR-10 cases hold them as uint8)."""
    return to_float(images) if images.dtype == torch.uint8 else images


def variant_settings(variant: str) -> dict:
    """``none`` (no repair), ``pin`` / ``protect`` (the default repair: fires on its signal), or ``pin@16`` /
    ``protect@0.9`` (forced on, at that pin weight or protected energy), ``prior@0.5`` (the default repair, the
    edit with the BatchNorm prior at that weight; ``prior@auto``: the weight chosen on U); a probe edits without repair."""
    if variant == "none" or variant.partition("@")[0] in PROBES:
        return {"repair": False}
    method, _, setting = variant.partition("@")
    if method == "prior":  # the default repair, with the BatchNorm prior in the preserved moment at weight W
        return {"batchnorm_prior": None if setting == "auto" else float(setting)}
    if not setting:
        return {"repair_method": method}
    key = "repair_weights" if method == "pin" else "repair_energies"
    return {"repair_method": method, "repair_tolerance": -1.0, key: (float(setting),)}


def apply_probe(variant: str, edited: torch.nn.Module, original: torch.nn.Module, layer: str, target: int) -> None:
    """A probe (``target_row@A``, ``target_logit@B``) on the unrepaired ``edited`` model, in place; nothing for the
    other variants. ``target_row`` needs ``layer`` to output the logits (one row per class)."""
    kind, _, value = variant.partition("@")
    if kind == "target_logit":
        def shift(module: torch.nn.Module, inputs: Any, logits: torch.Tensor) -> torch.Tensor:
            shifted = logits.clone()
            shifted[..., target] += float(value)
            return shifted
        edited.register_forward_hook(shift)
    elif kind == "target_row":
        weight, before = get_layer(edited, layer).weight, get_layer(original, layer).weight
        with torch.no_grad():
            weight[target] = before[target] + float(value) * (weight[target] - before[target])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["blended:1", "badnets:1"], help="attack:images_per_class")
    parser.add_argument("--layers", nargs="+", default=["blocks.2.conv2", "head"],
                        help="layers to edit, or auto (the defense's own choice)")
    parser.add_argument("--variants", nargs="+", default=["none", "pin", "pin@16", "pin@256", "protect@0.9"],
                        help="none, pin, protect, pin@W, protect@E, prior@W, prior@auto, or the probes target_row@A, target_logit@B")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="unseen draws (and the views' seed)")
    parser.add_argument("--min_images", type=int, default=None, help="the defense's min_images (None: its own default)")
    parser.add_argument("--runs", default="runs", help="folder of the CIFAR-10 cases' runs (cifar10-<attack>)")
    parser.add_argument("--rotation40", default="runs/bench/estimation-scaling/rotation40-backdoored-3000-seed0.pt",
                        help="the 40-class model's weights (case rotation40:B)")
    parser.add_argument("--cifar_root", default="../shared/data/cifar10", help="CIFAR-10 folder (rotation40 cases)")
    parser.add_argument("--cache_dir", default="runs/cache", help="decoded-image cache")
    parser.add_argument("--out", default=None, help="JSON file for every row")
    args = parser.parse_args()
    for variant in args.variants:
        kind, _, value = variant.partition("@")
        if kind in PROBES:
            try:
                float(value)
            except ValueError:
                parser.error(f"the probe {variant!r} needs a number: {kind}@0.5")
    if any(variant.startswith("target_row") for variant in args.variants) and args.layers != ["head"]:
        parser.error("the target_row probe scales a row of the head: give --layers head")
    for case in args.cases:
        attack, _, budget = case.partition(":")
        if not budget.isdigit() or int(budget) < 1:
            parser.error(f"case {case!r}: give attack:images_per_class, e.g. blended:1 or rotation40:5")
        checkpoint = Path(args.runs) / f"cifar10-{attack}" / "checkpoints" / "poisoned.ckpt"
        if attack != "rotation40" and not checkpoint.is_file():
            parser.error(f"case {case!r}: {checkpoint} does not exist: train it first with "
                         f"bash benchmarks/train_cifar10.sh {attack}")
    if any(case.startswith("rotation40:") for case in args.cases) and not Path(args.rotation40).is_file():
        parser.error(f"--rotation40 {args.rotation40} does not exist: make the 40-class model first with "
                     "python benchmarks/estimation_scaling.py --classes --attacks --many_classes 3000 "
                     "--out runs/bench/estimation-scaling/k40.json (it writes the default --rotation40)")
    rows = []
    for case in args.cases:
        attack, budget = case.split(":")
        network, knowledge, draw = (rotation40_case(Path(args.rotation40), args.cifar_root, args.cache_dir)
                                    if attack == "rotation40" else cifar10_case(attack, Path(args.runs)))
        draws = {seed: draw(int(budget), seed) for seed in args.seeds}
        before = {seed: evaluate(network, *draws[seed][1]) for seed in args.seeds}
        clean = {seed: held_out_float(draws[seed][1][0]) for seed in args.seeds}
        logits_before = ({seed: predict_logits(network, clean[seed]) for seed in args.seeds}
                         if "head" in args.layers else {})
        for layer in args.layers:
            for variant in args.variants:
                results = []
                for seed in args.seeds:
                    unseen, held_out = draws[seed]
                    model = copy.deepcopy(network)
                    sizes = {} if args.min_images is None else {"min_images": args.min_images}  # else its default
                    defense = ActivationEditing(layer=layer, seed=seed, **sizes, **variant_settings(variant))
                    started = time.perf_counter()
                    result = defense.defend(model, unseen, knowledge)
                    seconds = time.perf_counter() - started
                    apply_probe(variant, model, network, result.layer, knowledge.target_class)
                    after = evaluate(model, *held_out)
                    # at the head: the change of the target logit on the held-out clean images, of the target class
                    # and of the others
                    shifts = {"target_logit_shift": None, "others_logit_shift": None}
                    if layer == "head":
                        shift = (predict_logits(model, clean[seed]) - logits_before[seed])[:, knowledge.target_class]
                        is_target = held_out[1] == knowledge.target_class
                        shifts = {"target_logit_shift": shift[is_target].mean().item(),
                                  "others_logit_shift": shift[~is_target].mean().item()}
                    repair = result.details.get("repair", {})
                    signal = result.details.get("repair_signal", {})
                    results.append({"attack": attack, "budget": int(budget), "layer": layer,
                                    "edited_layer": result.layer, "variant": variant,
                                    "seed": seed, "seconds": seconds, "signal": signal.get("drop"),
                                    "repaired": result.repaired,
                                    "setting": repair.get("setting"),
                                    "prior_weight": result.details.get("batchnorm_prior", {}).get("weight"),
                                    "repair_signals": repair.get("drop_with_repair"),
                                    "triggered_rises": repair.get("triggered_rise_with_repair"),
                                    "validated": repair.get("validated"),
                                    "delta_ca": 100 * (after["clean_acc"] - before[seed]["clean_acc"]),
                                    "delta_ta": 100 * (after["target_acc"] - before[seed]["target_acc"]),
                                    "ta_before": 100 * before[seed]["target_acc"],
                                    "ta_after": 100 * after["target_acc"],
                                    "asr_gap": 100 * (after["asr"] - after["asr_floor"])} | shifts)
                rows += results
                mean = {key: statistics.mean(row[key] for row in results)
                        for key in ("delta_ca", "delta_ta", "asr_gap", "seconds", "ta_before", "ta_after")}
                repairs = variant != "none" and variant.partition("@")[0] not in PROBES
                signals = [row["signal"] for row in results if row["signal"] is not None]
                print(f"{attack} {budget}/class {layer} {variant}: held-out ΔCA {mean['delta_ca']:+.2f} "
                      f"ΔTA {mean['delta_ta']:+.2f} (TA {mean['ta_before']:.2f} -> {mean['ta_after']:.2f}) "
                      f"ASR−floor {mean['asr_gap']:+.2f} {mean['seconds']:.2f} s"
                      + (f"; signal {', '.join(f'{value:.3f}' for value in signals)}" if signals else "")
                      + (f"; edited {[row['edited_layer'] for row in results]}" if layer == "auto" else "")
                      + ("; target logit {:+.3f} on the target class's images, {:+.3f} on the others'".format(
                          *(statistics.mean(row[key] for row in results)
                            for key in ("target_logit_shift", "others_logit_shift"))) if layer == "head" else "")
                      + (f"; applied {sum(row['repaired'] for row in results)}/{len(results)}, settings "
                         f"{[row['setting'] for row in results]}" if repairs else "")
                      + (f"; guard's triggered rises {[row['triggered_rises'] for row in results]}"
                         if any(row["triggered_rises"] for row in results) else ""), flush=True)
    if args.out:
        atomic_json({"rows": rows, "threads": torch.get_num_threads()}, args.out)


if __name__ == "__main__":
    main()
