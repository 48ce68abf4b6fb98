"""Benchmark the editing defense on the trained CIFAR-10 checkpoints (train them with train_cifar10.sh first).

For every attack, unseen budget (images per class) and seed: draw the unseen images with that seed from the run's
unseen split, defend a copy of the poisoned model, and evaluate on the test split. Also reports, for choosing
settings without touching the test set, the same metrics on the *held-out* unseen images (the unseen split minus
the ones the defense used); ``--selection`` evaluates on those alone and never loads the test set. Every
evaluation also measures the ASR of the trigger's mirror image (``mirrored_asr``: models trained with random flips
learn it) and, with ``--moves``, of the trigger moved as a random crop moves it (``moved_asr``). Prints a markdown
table of mean ± std and writes every row as JSON.

    python benchmarks/defense_cifar10.py --attacks badnets blended --budgets 1 5 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from lightning_backdoor.data.poisoning import apply_trigger, to_float
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.report import augmented_asr
from lightning_backdoor.evaluation import evaluate, in_batches
from lightning_backdoor.io import atomic_json
from lightning_backdoor.runs import instantiate_run
from lightning_backdoor.triggers import augmentation_images


def forward_floor_seconds(model: torch.nn.Module, images: torch.Tensor, triggered: torch.Tensor) -> float:
    """Wall time of the two forward passes over U (clean and triggered) that any method of this kind needs."""
    start = time.perf_counter()
    with torch.no_grad():
        model(images)
        model(triggered)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads) if args.threads else None
    rows = []
    for attack in args.attacks:
        configs = ["configs/cifar10/base.yaml", f"configs/cifar10/{attack}.yaml", *args.model_config]
        overrides = [f"--data.init_args.root={args.data_root}"] if args.data_root else []
        if args.unseen_per_class is not None:  # the split the run was trained with (e.g. 250 for runs/*-u250)
            overrides.append(f"--data.init_args.unseen_per_class={args.unseen_per_class}")
        module, data = instantiate_run(configs, Path(args.runs) / args.run_name.format(attack) / "checkpoints" / "poisoned.ckpt",
                                       overrides or None)
        network = module.net.float().eval().to(args.device)
        mirrored, moves = augmentation_images(data.trigger, to_float(data.unseen_set(1, 0).images))

        def scores(model: torch.nn.Module, split: tuple[torch.Tensor, ...]) -> dict:
            """The metrics on ``split`` (images, labels, triggered images, attack labels), the mirror image's ASR on
            the same images (when it differs from the trigger) and, with ``--moves``, the largest ASR of the
            trigger and its mirror image moved by 4 px (local triggers)."""
            values = evaluate(model, *split, data.num_classes, data.target_class, bf16=args.bf16)
            return values | augmented_asr(model, mirrored, moves if args.moves else [], data.target_class,
                                          in_batches(*split[:2]))

        test = None if args.selection else data.test_dataset().tensors
        test_before = None if args.selection else scores(network, test)
        for budget in args.budgets:
            for seed in args.seeds:
                unseen = data.unseen_set(budget, seed)
                held_out = data.held_out_unseen_set(budget, seed)
                images = to_float(unseen.images).to(args.device)
                model = copy.deepcopy(network)
                defense = ActivationEditing(layer=args.layer, candidates=args.candidates, method=args.method,
                                            strength=args.strength or None,
                                            rank=args.rank, min_images=args.min_images, repair=not args.no_repair,
                                            spatial_weight=args.spatial_weight, seed=seed,
                                            batchnorm_prior=args.batchnorm_prior, mirror=args.mirror,
                                            shift=args.shift)
                torch.manual_seed(seed)
                result = defense.defend(model, UnseenData(images, unseen.labels.to(args.device)),
                                        BackdoorKnowledge.of(data.trigger, data.target_class))
                floor = forward_floor_seconds(network, images, data.trigger(images))
                held = (held_out.images, held_out.labels, apply_trigger(data.trigger, held_out.images),
                        data.attack_labels(held_out.labels))
                validation = scores(model, held)
                before = scores(network, held) if args.selection else test_before
                after = validation if args.selection else scores(model, test)
                rows.append({"attack": attack, "budget": budget, "seed": seed, "layer": result.layer,
                             "strength": result.details["strength"],
                             "prior_weight": result.details.get("batchnorm_prior", {}).get("weight", 0.0),
                             "views": result.details["views"],
                             "mirrored_triggers": result.details.get("mirrored_triggers"),
                             "shifted_triggers": result.details.get("shifted_triggers"),
                             "selection": result.details.get("selection"),
                             "repaired": result.repaired, "seconds": result.seconds, "forward_floor": floor,
                             "before": before, "after": after, "held_out_unseen": validation,
                             "settings": vars(args) | {"seeds": None}})
                print(f"{attack} k={budget} seed={seed} layer={result.layer} λ={result.details['strength']} "
                      f"w={rows[-1]['prior_weight']:g} "
                      f"repaired={result.repaired} {result.seconds:.2f}s  "
                      f"CA {before['clean_acc']:.4f}->{after['clean_acc']:.4f} "
                      f"ASR {before['asr']:.4f}->{after['asr']:.4f} (floor {after['asr_floor']:.4f}) "
                      + (f"mirrored ASR {before['mirrored_asr']:.4f}->{after['mirrored_asr']:.4f} "
                         if "mirrored_asr" in before else "its own mirror image ") +
                      (f"moved ASR {before['moved_asr']:.4f}->{after['moved_asr']:.4f} " if "moved_asr" in after
                       else "") +
                      f"TA {before['target_acc']:.4f}->{after['target_acc']:.4f} | held-out U: "
                      f"ASR {validation['asr']:.4f} CA {validation['clean_acc']:.4f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: mean ± std over seeds, in percent; time in seconds."""
    def cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
        if not values:
            return "–"
        values = [v * scale for v in values]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    lines = ["| attack | unseen/class | CA before | CA after | ASR before | ASR after | ASR floor | mirrored ASR before "
             "| mirrored ASR after | moved ASR before | moved ASR after | RA after | TA before | TA after | repaired | "
             "defense s | 2 fwd passes s | ratio |",
             "|" + " --- |" * 18]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["attack"], row["budget"]), []).append(row)
    for (attack, budget), group in groups.items():
        pick = lambda stage, name: [row[stage][name] for row in group if name in row[stage]]  # noqa: E731
        lines.append(f"| {attack} | {budget} | {cell(pick('before', 'clean_acc'))} | {cell(pick('after', 'clean_acc'))} "
                     f"| {cell(pick('before', 'asr'))} | {cell(pick('after', 'asr'))} | "
                     f"{cell(pick('after', 'asr_floor'))} | {cell(pick('before', 'mirrored_asr'))} | "
                     f"{cell(pick('after', 'mirrored_asr'))} | {cell(pick('before', 'moved_asr'))} | "
                     f"{cell(pick('after', 'moved_asr'))} | {cell(pick('after', 'robust_acc'))} | "
                     f"{cell(pick('before', 'target_acc'))} | {cell(pick('after', 'target_acc'))} | "
                     f"{sum(r['repaired'] for r in group)}/{len(group)} | "
                     f"{cell([r['seconds'] for r in group], 1, 3)} | {cell([r['forward_floor'] for r in group], 1, 3)} "
                     f"| {cell([r['seconds'] / r['forward_floor'] for r in group], 1, 1)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blended", "wanet", "sig"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 5, 10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--layer", default="blocks.2.conv2")
    parser.add_argument("--candidates", type=int, default=ActivationEditing().candidates,
                        help="how many layers --layer auto tries")
    parser.add_argument("--method", default="closed_form", choices=["closed_form", "rank_r"])
    parser.add_argument("--strength", type=float, default=ActivationEditing().strength,
                        help="λ (0 = choose it by cross-validation on the unseen split)")
    parser.add_argument("--rank", type=int, default=ActivationEditing().rank)
    parser.add_argument("--min_images", type=int, default=ActivationEditing().min_images)
    parser.add_argument("--spatial_weight", default="uniform", choices=["uniform", "mask"])
    parser.add_argument("--no_repair", action="store_true")
    parser.add_argument("--mirror", type=lambda text: {"auto": None, "true": True, "false": False}[text], default=None,
                        help="auto (default: the mirrored trigger when it works on U), true or false")
    parser.add_argument("--shift", type=lambda text: None if text == "auto" else int(text), default=None,
                        help="ActivationEditing's shift in pixels (auto, the default: 1/8 of the width; 0: no moves)")
    parser.add_argument("--moves", action="store_true",
                        help="also measure moved_asr: the largest ASR of the trigger and its mirror image moved by "
                             "4 px along each axis and both (local triggers; one pass per move)")
    parser.add_argument("--batchnorm_prior", type=lambda text: None if text == "auto" else float(text), default=0.0,
                        help="weight of the BatchNorm prior in the preserved key moment (0: Ledoit-Wolf, the default; "
                             "auto: chosen by cross-validation on the unseen split)")
    parser.add_argument("--selection", action="store_true",
                        help="evaluate on the held-out unseen images only, never the test set: for choosing settings")
    parser.add_argument("--bf16", action="store_true",
                        help="evaluate under bf16 autocast (about twice as fast on CPU; a prediction within bf16's "
                             "rounding can flip, lightning_backdoor.evaluation.evaluate)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the model, the defense and the evaluations run "
                        "(cpu, cuda, cuda:1, ...); the figures match the CPU's to rounding: docs/results/gpu.md")
    parser.add_argument("--model_config", nargs="*", default=[],
                        help="config files put after the attack's (e.g. configs/cifar10/preact_resnet18.yaml)")
    parser.add_argument("--unseen_per_class", type=int, default=None,
                        help="the unseen split per class the run was trained with, when not the config's (250 for "
                             "runs/cifar10-badnets-u250)")
    parser.add_argument("--run_name", default="cifar10-{}", help="the run folder of an attack, {} = its name")
    parser.add_argument("--data_root", default=None, help="CIFAR-10 ImageFolder root (default: the configs')")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="runs/bench/defense.json")
    args = parser.parse_args()
    rows = run(args)
    atomic_json(rows, args.out)
    print(("on the held-out unseen images (selection mode: no test set)\n" if args.selection else "") + table(rows))
    print(f"rows: {args.out}")


if __name__ == "__main__":
    main()
