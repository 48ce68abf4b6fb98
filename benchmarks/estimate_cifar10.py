"""Benchmark the defense with the trigger unknown on the CIFAR-10 checkpoints (train them with train_cifar10.sh,
the clean model with ``EPOCHS=8 bash benchmarks/train_cifar10.sh clean``).

For every run: draw ``--budget`` unseen images per class (seeded), let ActivationEditing estimate the trigger and
target (no backdoor knowledge) and edit with the estimate, then evaluate on the test split with the real trigger.
Also measures the ASR of the trigger's mirror image (``mirrored_asr``: models trained with random flips learn it)
where it differs from the trigger. Prints a markdown table (target found, ASR after vs floor, CA drop, seconds of
estimation / editing / total) and writes every row as JSON.

    python benchmarks/estimate_cifar10.py --runs badnets blended wanet sig clean --budget 10
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lightning_backdoor.data.poisoning import to_float
from lightning_backdoor.defenses import ActivationEditing, EstimateFirst, UnseenData
from lightning_backdoor.defenses.estimation import TriggerEstimator, size_ratio
from lightning_backdoor.defenses.outputs import save_image
from lightning_backdoor.defenses.report import augmented_asr
from lightning_backdoor.evaluation import evaluate, in_batches
from lightning_backdoor.io import atomic_json
from lightning_backdoor.runs import instantiate_run
from lightning_backdoor.triggers import augmentation_images


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.runs:
        configs = ["configs/cifar10/base.yaml", f"configs/cifar10/{name}.yaml", *args.model_config]
        module, data = instantiate_run(configs, Path(args.root) / args.run_name.format(name) / "checkpoints" / "poisoned.ckpt",
                                       [f"--data.init_args.root={args.data_root}"] if args.data_root else None)
        network = module.net.float().eval().to(args.device)
        test = data.test_dataset().tensors
        unseen = data.unseen_set(args.budget, args.seed)
        mirrored, moves = (augmentation_images(data.trigger, to_float(unseen.images))
                           if data.poison_rate > 0 else (None, []))

        def scores(model: torch.nn.Module) -> dict:
            """The test metrics, with the mirror image's ASR where the trigger has a distinct one and, with
            ``--moves``, the largest ASR of the trigger and its mirror image moved by 4 px (local triggers)."""
            values = evaluate(model, *test, data.num_classes, data.target_class, bf16=args.bf16)
            return values | augmented_asr(model, mirrored, moves if args.moves else [], data.target_class,
                                          in_batches(*test[:2]))

        before = scores(network)
        model = copy.deepcopy(network)
        estimator = TriggerEstimator(estimators=tuple(args.estimators), strengths=tuple(args.edit_strengths),
                                     max_steps=args.max_steps, batch_size=args.batch_size,
                                     progress=not args.no_progress, seed=args.seed)
        defense = EstimateFirst(ActivationEditing(layer=args.layer, candidates=args.candidates,
                                                  strength=args.strength, seed=args.seed,
                                                  shift=args.shift), estimator)
        start = time.perf_counter()
        result = defense.defend(model, UnseenData(to_float(unseen.images).to(args.device),
                                                  unseen.labels.to(args.device)), None)
        total = time.perf_counter() - start
        after = scores(model)
        info = result.details
        estimation = info["estimation"]
        if result.picture is not None:
            save_image(result.picture, Path(args.out).with_name(f"estimated-{name}.png"))
        poisoned = data.poison_rate > 0
        row = {"run": name, "poisoned": poisoned, "true_target": data.target_class if poisoned else None,
               "estimated_target": estimation["target_class"], "estimator": estimation["estimator"],
               "flagged_by": estimation["flagged_by"],
               "anomaly_index": estimation["anomaly_index"], "trigger_size": estimation["trigger_size"],
               "steps": estimation["steps"], "estimation_seconds": info["estimation_seconds"],
               "mirrored_triggers": info.get("mirrored_triggers"), "shifted_triggers": info.get("shifted_triggers"),
               "layer": result.layer, "strength": info.get("strength"), "selection": info.get("selection"),
               "editing_seconds": info["editing_seconds"], "total_seconds": total, "before": before,
               "after": after, "settings": vars(args)}
        rows.append(row)
        print(f"{name}: estimated target {row['estimated_target']} ({row['estimator']}), anomaly indices "
              f"{estimation['anomaly_index']}; CA {before['clean_acc']:.4f}->{after['clean_acc']:.4f} "
              f"ASR {before['asr']:.4f}->{after['asr']:.4f} (floor {after['asr_floor']:.4f}) "
              + (f"mirrored ASR {before['mirrored_asr']:.4f}->{after['mirrored_asr']:.4f} " if "mirrored_asr" in after
                 else "") +
              (f"moved ASR {before['moved_asr']:.4f}->{after['moved_asr']:.4f} " if "moved_asr" in after else "") +
              f"in {info['estimation_seconds']:.1f} + {info['editing_seconds']:.1f} s", flush=True)
    return rows


def evidence(row: dict) -> str:
    """Each flagging estimator's log anomaly index and size ratio for the flagged class; with no flag, the largest
    index of any class and that class's size ratio."""
    ratios = {name: size_ratio(torch.tensor(sizes)).tolist() for name, sizes in row["trigger_size"].items()}
    label = row["estimated_target"]
    if label is not None:
        return ", ".join(f"{name} {row['anomaly_index'][name][label]:.2f}, {ratios[name][label]:.2f}"
                         for name in row["flagged_by"])
    name, label = max(((name, label) for name, values in row["anomaly_index"].items() for label in range(len(values))),
                      key=lambda pair: row["anomaly_index"][pair[0]][pair[1]])
    return f"none ({name} class {label}: {row['anomaly_index'][name][label]:.2f}, {ratios[name][label]:.2f})"


def mirror_cell(before: dict, after: dict) -> str:
    """The mirror image's ASR before → after in percent ("–" where it was not measured: no trigger, or one that is
    its own mirror image), and the moved trigger's where measured (``--moves``)."""
    cell = (f"{100 * before['mirrored_asr']:.2f} → {100 * after['mirrored_asr']:.2f}" if "mirrored_asr" in after
            else "–")
    if "moved_asr" in after:
        cell += f"; moved {100 * before['moved_asr']:.2f} → {100 * after['moved_asr']:.2f}"
    return cell


def table(rows: list[dict]) -> str:
    """Markdown, percentages and seconds."""
    lines = ["| model | target found | flagged by: log index, size ratio (else the largest index) | CA before | "
             "CA after | ASR before | ASR after | ASR floor | mirrored ASR before → after | TA after | estimation s | "
             "edit s | total s |",
             "|" + " --- |" * 13]
    for row in rows:
        before, after = row["before"], row["after"]
        if row["poisoned"]:
            found = "yes" if row["estimated_target"] == row["true_target"] else f"no ({row['estimated_target']})"
        else:
            found = ("no backdoor found" if row["estimated_target"] is None
                     else f"false alarm ({row['estimated_target']})")
        lines.append(f"| {row['run']} | {found} | {evidence(row)} | {100 * before['clean_acc']:.2f} | "
                     f"{100 * after['clean_acc']:.2f} | {100 * before['asr']:.2f} | {100 * after['asr']:.2f} | "
                     f"{100 * after['asr_floor']:.2f} | {mirror_cell(before, after)} | {100 * after['target_acc']:.2f} | "
                     f"{row['estimation_seconds']:.1f} | {row['editing_seconds']:.1f} | {row['total_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["badnets", "blended", "wanet", "sig", "clean"])
    parser.add_argument("--budget", type=int, default=10, help="unseen images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimators", nargs="+", default=list(TriggerEstimator().estimators))
    parser.add_argument("--edit_strengths", nargs="+", type=float, default=list(TriggerEstimator().strengths),
                        help="the factors the edit scales each estimated candidate by")
    parser.add_argument("--max_steps", type=int, default=TriggerEstimator().max_steps)
    parser.add_argument("--batch_size", type=int, default=TriggerEstimator().batch_size)
    parser.add_argument("--layer", default="blocks.2.conv2")
    parser.add_argument("--candidates", type=int, default=ActivationEditing().candidates,
                        help="how many layers --layer auto tries")
    parser.add_argument("--strength", type=lambda value: None if value == "cv" else float(value), default=10.0,
                        help="λ of the edit, or cv: chosen by cross-validation on the unseen split")
    parser.add_argument("--shift", type=lambda text: None if text == "auto" else int(text), default=None,
                        help="ActivationEditing's shift in pixels (auto, the default: 1/8 of the width; 0: no moves)")
    parser.add_argument("--moves", action="store_true",
                        help="also measure moved_asr: the largest ASR of the trigger and its mirror image moved by "
                             "4 px along each axis and both (local triggers; one test pass per move)")
    parser.add_argument("--bf16", action="store_true",
                        help="evaluate under bf16 autocast (about twice as fast on CPU; a prediction within bf16's "
                             "rounding can flip, lightning_backdoor.evaluation.evaluate)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the model, the defense and the evaluations run "
                        "(cpu, cuda, cuda:1, ...); the figures match the CPU's to rounding: docs/results/gpu.md")
    parser.add_argument("--model_config", nargs="*", default=[],
                        help="config files put after the attack's (e.g. configs/cifar10/preact_resnet18.yaml)")
    parser.add_argument("--run_name", default="cifar10-{}", help="the run folder of an attack, {} = its name")
    parser.add_argument("--data_root", default=None, help="CIFAR-10 ImageFolder root (default: the configs')")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--root", default="runs")
    parser.add_argument("--out", default="runs/bench/estimate/estimate.json")
    parser.add_argument("--table_only", action="store_true", help="only print the table of the rows in --out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table_only:
        print(table(json.loads(Path(args.out).read_text())))
        return
    rows = run(args)
    atomic_json(rows, args.out)
    print(table(rows))
    print(f"rows: {args.out}")


if __name__ == "__main__":
    main()
