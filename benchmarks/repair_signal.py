"""Choose the repair step on U alone: its signal and the two repairs, on the trained CIFAR-10 checkpoints.

For every case (attack, unseen images per class), edited layer and seed: the edit without repair (``none``), the
repair as the defense runs it (``pin``/``protect``: fired by the cross-fitted signal, its setting chosen by it), or
forced on at one setting (``pin@16``: target keys added to the preserved ones at weight 16; ``protect@0.9``: the edit
kept out of the subspace holding 90 % of the target keys' energy). Prints the signal (drop of the target-class
probability on held-out folds of U) and, on the *held-out* unseen images (the unseen split minus the images the
defense used; the test split is never loaded), ΔCA, ΔTA and ASR minus its floor. Mean of the seeds, one line per
setting; ``--out`` keeps every row as JSON.

    python benchmarks/repair_signal.py --cases blended:1 badnets:1 --layers blocks.2.conv2 head --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from lightning_backdoor.data.poisoning import apply_trigger, to_float
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.evaluation import evaluate
from lightning_backdoor.io import atomic_json
from lightning_backdoor.runs import instantiate_run



def variant_settings(variant: str) -> dict:
    """``none`` (no repair), ``pin`` / ``protect`` (the default repair: fires on its signal), or ``pin@16`` /
    ``protect@0.9`` (forced on, at that pin weight or protected energy)."""
    if variant == "none":
        return {"repair": False}
    method, _, setting = variant.partition("@")
    if not setting:
        return {"repair_method": method}
    key = "repair_weights" if method == "pin" else "repair_energies"
    return {"repair_method": method, "repair_tolerance": -1.0, key: (float(setting),)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["blended:1", "badnets:1"], help="attack:images_per_class")
    parser.add_argument("--layers", nargs="+", default=["blocks.2.conv2", "head"])
    parser.add_argument("--variants", nargs="+", default=["none", "pin", "pin@16", "pin@256", "protect@0.9"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        attack, budget = case.split(":")
        module, data = instantiate_run(["configs/cifar10/base.yaml", f"configs/cifar10/{attack}.yaml"],
                                       Path(args.runs) / f"cifar10-{attack}" / "checkpoints" / "poisoned.ckpt")
        network = module.net.float().eval()
        knowledge = BackdoorKnowledge.of(data.trigger, data.target_class)
        for layer in args.layers:
            for variant in args.variants:
                results = []
                for seed in args.seeds:
                    unseen, held = data.unseen_set(int(budget), seed), data.held_out_unseen_set(int(budget), seed)
                    held_out = (held.images, held.labels, apply_trigger(data.trigger, held.images),
                                data.attack_labels(held.labels), data.num_classes, data.target_class)
                    model = copy.deepcopy(network)
                    defense = ActivationEditing(layer=layer, seed=seed, **variant_settings(variant))
                    started = time.perf_counter()
                    result = defense.defend(model, UnseenData(to_float(unseen.images), unseen.labels), knowledge)
                    seconds = time.perf_counter() - started
                    before, after = evaluate(network, *held_out), evaluate(model, *held_out)
                    repair = result.details.get("repair", {})
                    signal = result.details.get("repair_signal", {})
                    results.append({"attack": attack, "budget": int(budget), "layer": layer, "variant": variant,
                                    "seed": seed, "seconds": seconds, "signal": signal.get("drop"),
                                    "repaired": result.repaired,
                                    "setting": repair.get("setting"),
                                    "repair_signals": repair.get("drop_with_repair"),
                                    "validated": repair.get("validated"),
                                    "delta_ca": 100 * (after["clean_acc"] - before["clean_acc"]),
                                    "delta_ta": 100 * (after["target_acc"] - before["target_acc"]),
                                    "asr_gap": 100 * (after["asr"] - after["asr_floor"])})
                rows += results
                mean = {key: statistics.mean(row[key] for row in results)
                        for key in ("delta_ca", "delta_ta", "asr_gap", "seconds")}
                signals = [row["signal"] for row in results if row["signal"] is not None]
                print(f"{attack} {budget}/class {layer} {variant}: held-out ΔCA {mean['delta_ca']:+.2f} "
                      f"ΔTA {mean['delta_ta']:+.2f} ASR−floor {mean['asr_gap']:+.2f} {mean['seconds']:.2f} s"
                      + (f"; signal {', '.join(f'{value:.3f}' for value in signals)}" if signals else "")
                      + (f"; fired {sum(row['repaired'] for row in results)}/{len(results)}, settings "
                         f"{[row['setting'] for row in results]}" if variant != "none" else ""), flush=True)
    if args.out:
        atomic_json({"rows": rows, "threads": torch.get_num_threads()}, args.out)


if __name__ == "__main__":
    main()
