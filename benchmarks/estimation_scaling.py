"""Trigger estimation's cost against the number of classes K, exhaustive vs pre-screened, and its verdicts.

Part 1 (cost): a K-class problem built offline from CIFAR-10 by classes x rotations (label = class + 10 * r for a
rotation of 90 * r degrees; K = 10, 20, 40: rotations {0}, {0, 90}, {0, 90, 180, 270}). One compact CNN (the CIFAR-10
configs' widths 64, 128, 256) is trained briefly (``--train_steps``) on all 40 classes, 10 % of each batch carrying a
3x3 white BadNets patch relabelled to class 0; the K-class model is that network with the first K rows of its
head (the estimation's cost depends on K and the architecture, not on the model's accuracy). The unseen images are
``--per_class`` images of every class from CIFAR-10's test split (never trained on). Each K is estimated with the
exhaustive inversion (``prescreen_steps=None``: the estimator before the pre-screen) and pre-screened (the
defaults, with the pre-screen forced on for K < 16 too: ``prescreen_min_classes=3``), in the same process, one
after the other.

Part 2 (verdicts): the CIFAR-10 checkpoints of ``benchmarks/train_cifar10.sh`` (``runs/cifar10-<attack>``, 10
unseen images per class, seed 0, feature layer below ``blocks.2.conv2`` as ``estimate_cifar10.py``) and quickstart
runs (``--quickstart``: a backdoored and a clean one, e.g. ``lightning-backdoor fit --config
configs/quickstart.yaml [--data.init_args.poison_rate=0] --trainer.default_root_dir DIR``), exhaustive vs
pre-screened (forced on: these models have 10 classes).

Part 3 (verdicts at 40 classes, ``--many_classes STEPS``): two 40-class models of part 1's kind trained for real
(STEPS batches each), one backdoored (10 % BadNets to class 0) and one clean; ``--budget`` unseen images of every
(class, rotation) from CIFAR-10's test split; exhaustive and/or (``--modes``) pre-screened with
``--prescreen_steps`` steps (20; the other pre-screen settings at their defaults, so on from 16 classes; parts 1
and 2 always use ``PRESCREENED``). The models' accuracy and attack success rate are measured on the rest of the
test split; the trained weights are kept beside ``--out`` (``rotation40-<backdoored|clean>-<STEPS>-seed<S>.pt``)
and reused by a run with the same folder, steps and seed. ``--classes --attacks`` with no values skip parts 1
and 2.

    python benchmarks/estimation_scaling.py --classes 10 20 40 --attacks badnets blended wanet sig \\
        --quickstart runs/quickstart runs/quickstart-clean
    python benchmarks/estimation_scaling.py --classes --attacks --many_classes 3000 \\
        --out runs/bench/estimation-scaling/k40.json

Prints one markdown table per part and writes every row as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_backdoor.data.poisoning import to_float
from lightning_backdoor.data.sources import load_source
from lightning_backdoor.defenses import UnseenData
from lightning_backdoor.defenses.estimation import TriggerEstimator
from lightning_backdoor.io import atomic_json
from lightning_backdoor.models import CompactNet
from lightning_backdoor.precision import use_bf16
from lightning_backdoor.runs import instantiate_run
from lightning_backdoor.triggers import BadNets

ROTATIONS = 4
EXHAUSTIVE = {"prescreen_steps": None, "early_stop": "all"}
PRESCREENED = {"prescreen_steps": 20, "prescreen_min_classes": 3}  # at every K (the default pre-screens from 16 classes)


def rotated(images: Tensor, labels: Tensor, rotation: Tensor) -> tuple[Tensor, Tensor]:
    """Images (N, C, H, W) turned by ``rotation`` (N,) quarter turns, labelled ``label + 10 * rotation``."""
    turned = torch.stack([image.rot90(int(turns), dims=(1, 2)) for image, turns in zip(images, rotation)])
    return turned, labels + 10 * rotation


def train_rotation_model(train_images: Tensor, train_labels: Tensor, steps: int, seed: int,
                         poison_rate: float = 0.1) -> CompactNet:
    """A 40-class compact CNN trained ``steps`` batches of 128 on rotated CIFAR-10 (uint8 (N, 3, 32, 32)), a
    ``poison_rate`` fraction of each batch stamped with a 3x3 white patch and relabelled to 0 (SGD, one-cycle, bf16
    autocast where the CPU computes it natively, else float32; no flips: a flipped turn looks like the opposite
    turn)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CompactNet(num_classes=10 * ROTATIONS, widths=(64, 128, 256)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=steps, pct_start=0.2)
    trigger, batch = BadNets(size=3), 128
    model.train()
    for _ in range(steps):
        chosen = torch.randint(len(train_labels), (batch,), generator=generator)
        images, labels = rotated(to_float(train_images[chosen]), train_labels[chosen],
                                 torch.randint(ROTATIONS, (batch,), generator=generator))
        poisoned = torch.rand(batch, generator=generator) < poison_rate
        images = torch.where(poisoned[:, None, None, None], trigger(images), images)
        labels = torch.where(poisoned, torch.zeros_like(labels), labels)
        with torch.autocast("cpu", torch.bfloat16, enabled=use_bf16(None)):  # where the CPU computes it natively
            loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)).float(), labels,
                                   label_smoothing=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def first_classes(model: CompactNet, num_classes: int) -> CompactNet:
    """``model`` as a ``num_classes``-class classifier: the first rows of its head."""
    narrowed = CompactNet(num_classes=num_classes, widths=(64, 128, 256))
    state = model.state_dict()
    state["head.weight"] = state["head.weight"][:num_classes]
    narrowed.load_state_dict(state)
    return narrowed.eval()


def estimate(model: torch.nn.Module, unseen: UnseenData, layer: str, settings: dict[str, Any],
             seed: int) -> dict[str, Any]:
    """One estimation: its seconds, verdict and what the pre-screen kept."""
    estimator = TriggerEstimator(progress=False, seed=seed, **settings)
    start = time.perf_counter()
    found = estimator.estimate(model, unseen, layer)
    seconds = time.perf_counter() - start
    details = found.details
    return {"seconds": seconds, "target": found.target_class, "flagged_by": details["flagged_by"],
            "estimator_seconds": details["estimator_seconds"], "steps": details["steps"],
            "screened_out": details["screened_out"], "fully_inverted": details["fully_inverted"],
            "anomaly_index": details["anomaly_index"], "size_ratio": details["size_ratio"],
            "confirmed": details["confirmed"], "prescreen_size": details["prescreen_size"]}


def prescreen_rank(result: dict[str, Any], label: int) -> str:
    """Class ``label``'s rank by pre-screen size among all classes, per estimator (1: smallest). The pre-screen's
    own order (:func:`~lightning_backdoor.defenses.estimation.prescreen_order`) puts classes that already reached the
    success rate first."""
    ranks = {name: 1 + sum(size < sizes[label] for size in sizes) for name, sizes in result["prescreen_size"].items()}
    return ", ".join(f"{name} {rank}" for name, rank in ranks.items()) or "–"


def evidence(result: dict[str, Any]) -> str:
    """The flagging estimators with the target's index, else the largest index of a flaggable class."""
    if result["target"] is not None:
        label = result["target"]
        return ", ".join(f"{name} {result['anomaly_index'][name][label]:.2f}/{result['size_ratio'][name][label]:.2f}"
                         for name in result["flagged_by"])
    name, label = max(((name, label) for name, values in result["anomaly_index"].items()
                       for label in result["fully_inverted"][name]),
                      key=lambda pair: result["anomaly_index"][pair[0]][pair[1]])
    return (f"none (largest: {name} class {label} {result['anomaly_index'][name][label]:.2f}/"
            f"{result['size_ratio'][name][label]:.2f})")


def verdict(target: int | None, true_target: int | None) -> str:
    if true_target is None:
        return "no backdoor found" if target is None else f"false alarm ({target})"
    return "found" if target == true_target else ("not found" if target is None else f"wrong ({target})")


def scaling(args: argparse.Namespace, rows: list[dict[str, Any]], save: Any) -> None:
    train, test = load_source("cifar10", root=args.cifar_root, cache_dir=args.cache_dir)
    began = time.perf_counter()
    network = train_rotation_model(train.images, train.labels, args.train_steps, args.seed)
    print(f"trained the 40-class model: {args.train_steps} steps in {time.perf_counter() - began:.0f} s", flush=True)
    unseen_images, unseen_labels, _ = rotated_unseen(test.images, test.labels, args.per_class, args.seed)
    accuracy, asr = accuracy_and_asr(network, unseen_images, unseen_labels)
    print(f"40-class model on the unseen images: accuracy {accuracy:.3f}, patch -> class 0 {asr:.3f}", flush=True)
    for num_classes in args.classes:
        keep = unseen_labels < num_classes
        unseen = UnseenData(unseen_images[keep], unseen_labels[keep])
        model = first_classes(network, num_classes)
        row: dict[str, Any] = {"classes": num_classes, "unseen": int(keep.sum())}
        for mode, settings in (("exhaustive", EXHAUSTIVE), ("prescreened", PRESCREENED)):
            row[mode] = estimate(model, unseen, "auto", settings, args.seed)
            print(f"K={num_classes} {mode}: {row[mode]['seconds']:.1f} s, target {row[mode]['target']} "
                  f"({evidence(row[mode])}); screened out: {row[mode]['screened_out']}", flush=True)
        rows.append(row)
        save()


def rotated_unseen(images: Tensor, labels: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``per_class`` seeded images of each of the 40 (class, rotation) classes from uint8 CIFAR-10 images: float
    images (N, 3, 32, 32) in [0, 1], labels (N,), and the indices picked."""
    generator = torch.Generator().manual_seed(seed)
    picked = torch.cat([torch.nonzero(labels == label).flatten()[
        torch.randperm(int((labels == label).sum()), generator=generator)[:per_class * ROTATIONS]]
        for label in range(10)])
    turns = torch.arange(len(picked)) % ROTATIONS  # per_class images of every (class, rotation)
    return *rotated(to_float(images[picked]), labels[picked], turns), picked


@torch.no_grad()
def accuracy_and_asr(network: torch.nn.Module, images: Tensor, labels: Tensor) -> tuple[float, float]:
    """Accuracy on ``images`` and the fraction of non-target ones the 3x3 patch sends to class 0 (fractions)."""
    correct, hits, batch = 0, 0, 1000
    for chunk, chunk_labels in zip(images.split(batch), labels.split(batch)):
        with torch.autocast("cpu", torch.bfloat16):
            correct += int((network(chunk).argmax(-1) == chunk_labels).sum())
            hits += int((network(BadNets(size=3)(chunk[chunk_labels != 0])).argmax(-1) == 0).sum())
    return correct / len(labels), hits / int((labels != 0).sum())


def many_classes(args: argparse.Namespace, rows: list[dict[str, Any]], save: Any) -> None:
    """Part 3: the verdicts at K = 40 on real models, one backdoored (10 % BadNets to class 0) and one clean,
    each trained ``--many_classes`` steps; the estimates ``--modes`` names: exhaustive, and pre-screened with
    ``--prescreen_steps`` (on from 16 classes)."""
    train, test = load_source("cifar10", root=args.cifar_root, cache_dir=args.cache_dir)
    unseen_images, unseen_labels, picked = rotated_unseen(test.images, test.labels, args.budget, args.seed)
    rest = torch.ones(len(test.labels), dtype=torch.bool)
    rest[picked] = False  # the model's figures on the test images that are not unseen images
    test_images, test_labels = rotated(to_float(test.images[rest]), test.labels[rest],
                                       torch.arange(int(rest.sum())) % ROTATIONS)
    unseen = UnseenData(unseen_images, unseen_labels)
    for name, poison_rate in (("backdoored", 0.1), ("clean", 0.0)):
        path = Path(args.out).parent / f"rotation40-{name}-{args.many_classes}-seed{args.seed}.pt"
        began = time.perf_counter()
        network = CompactNet(num_classes=10 * ROTATIONS, widths=(64, 128, 256))
        if path.exists():  # a finished training is reused: weights only, never pickled code
            network.load_state_dict(torch.load(path, weights_only=True))
            train_seconds = None
        else:
            network = train_rotation_model(train.images, train.labels, args.many_classes, args.seed, poison_rate)
            train_seconds = time.perf_counter() - began
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(network.state_dict(), path)
        network = network.float().eval().to(memory_format=torch.contiguous_format)
        accuracy, asr = accuracy_and_asr(network, test_images, test_labels)
        print(f"40-class {name} model ({args.many_classes} steps, trained in "
              f"{'(cached)' if train_seconds is None else f'{train_seconds:.0f} s'}): test accuracy "
              f"{100 * accuracy:.2f} %, patch -> class 0 {100 * asr:.2f} %", flush=True)
        row: dict[str, Any] = {"run": f"40 classes, {name}", "true_target": 0 if poison_rate else None,
                               "steps": args.many_classes, "train_seconds": train_seconds,
                               "test_accuracy": accuracy, "attack_success_rate": asr, "unseen": len(unseen_labels)}
        for mode, settings in (("exhaustive", EXHAUSTIVE), ("prescreened", {"prescreen_steps": args.prescreen_steps})):
            if mode not in args.modes:
                continue
            row[mode] = estimate(network, unseen, "auto", settings, args.seed)
            print(f"40 classes, {name}, {mode}: {row[mode]['seconds']:.1f} s, "
                  f"{verdict(row[mode]['target'], row['true_target'])} ({evidence(row[mode])}); screened out: "
                  f"{ {key: len(value) for key, value in row[mode]['screened_out'].items()} }; confirmed: "
                  f"{row[mode]['confirmed']}", flush=True)
        rows.append(row)
        save()


def verdicts(args: argparse.Namespace, rows: list[dict[str, Any]], save: Any) -> None:
    runs = [(attack, ["configs/cifar10/base.yaml", f"configs/cifar10/{attack}.yaml"],
             Path(args.root) / f"cifar10-{attack}" / "checkpoints" / "poisoned.ckpt", "blocks.2.conv2", 0)
            for attack in args.attacks]
    for folder in args.quickstart:
        runs.append((f"quickstart ({folder})", ["configs/quickstart.yaml"],
                     Path(folder) / "checkpoints" / "poisoned.ckpt", "auto", None))
    for name, configs, checkpoint, layer, seed in runs:
        module, data = quickstart_run(configs, checkpoint) if seed is None else instantiate_run(configs, checkpoint)
        network = module.net.float().eval()
        unseen_set = data.unseen_set(args.budget, seed)
        unseen = UnseenData(to_float(unseen_set.images), unseen_set.labels)
        true_target = data.target_class if data.poison_rate > 0 else None
        row: dict[str, Any] = {"run": name, "true_target": true_target}
        for mode, settings in (("exhaustive", EXHAUSTIVE), ("prescreened", PRESCREENED)):
            row[mode] = estimate(network, unseen, layer, settings, args.seed)
            print(f"{name} {mode}: {row[mode]['seconds']:.1f} s, {verdict(row[mode]['target'], true_target)} "
                  f"({evidence(row[mode])}); screened out: {row[mode]['screened_out']}", flush=True)
        rows.append(row)
        save()


def quickstart_run(configs: list[str], checkpoint: Path) -> tuple[Any, Any]:
    """A quickstart run, backdoored or clean (a clean one was fitted with ``poison_rate=0``)."""
    try:
        return instantiate_run(configs, checkpoint)
    except ValueError as error:
        if "poison_rate=0.0" not in str(error):
            raise
        return instantiate_run(configs, checkpoint, ["--data.init_args.poison_rate=0"])


def tables(result: dict[str, Any]) -> str:
    lines = ["| K | unseen images | exhaustive s | pre-screened s | ratio | exhaustive verdict | pre-screened verdict "
             "| screened out (per estimator, most) |", "|" + " --- |" * 8]
    for row in result["scaling"]:
        exhaustive, screened = row["exhaustive"], row["prescreened"]
        most = max(len(classes) for classes in screened["screened_out"].values())
        lines.append(f"| {row['classes']} | {row['unseen']} | {exhaustive['seconds']:.1f} | {screened['seconds']:.1f} "
                     f"| {screened['seconds'] / exhaustive['seconds']:.2f} | {verdict(exhaustive['target'], 0)} "
                     f"({evidence(exhaustive)}) | {verdict(screened['target'], 0)} ({evidence(screened)}) | "
                     f"{most} of {row['classes']} |")
    lines += ["", "| model | exhaustive: verdict (estimator index/ratio) | s | pre-screened: verdict | s |",
              "|" + " --- |" * 5]
    for row in result["verdicts"]:
        exhaustive, screened = row["exhaustive"], row["prescreened"]
        lines.append(f"| {row['run']} | {verdict(exhaustive['target'], row['true_target'])} ({evidence(exhaustive)}) | "
                     f"{exhaustive['seconds']:.1f} | {verdict(screened['target'], row['true_target'])} "
                     f"({evidence(screened)}) | {screened['seconds']:.1f} |")
    lines += ["", "| model (40 classes) | test accuracy % | patch -> class 0 % | mode | verdict (estimator index/ratio) "
              "| s | fully inverted (per estimator, most) | class 0's rank by pre-screen size | confirmed |",
              "|" + " --- |" * 9]
    for row in result.get("many_classes", []):
        for mode in ("exhaustive", "prescreened"):
            if mode not in row:
                continue
            found = row[mode]
            most = max(len(classes) for classes in found["fully_inverted"].values())
            confirmed = "; ".join(f"{name}: {value}" for name, value in found["confirmed"].items()) or "–"
            rank = prescreen_rank(found, 0) if found.get("prescreen_size") else "–"
            lines.append(f"| {row['run']} | {100 * row['test_accuracy']:.2f} | {100 * row['attack_success_rate']:.2f} "
                         f"| {mode} | {verdict(found['target'], row['true_target'])} ({evidence(found)}) | "
                         f"{found['seconds']:.1f} | {most} of 40 | {rank} | {confirmed} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds of the exhaustive and the pre-screened estimation against K, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = sorted(result["scaling"], key=lambda row: row["classes"])
    classes = [row["classes"] for row in rows]
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for mode, label in (("exhaustive", "exhaustive"), ("prescreened", "pre-screened (prescreen_steps=20)")):
        axes.plot(classes, [row[mode]["seconds"] for row in rows], "o-", label=label)
    axes.set(xlabel="classes K", ylabel="seconds", title="trigger estimation against K", xticks=classes)
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", nargs="*", type=int, default=[10, 20, 40], help="K values (at most 40)")
    parser.add_argument("--per_class", type=int, default=5, help="unseen images per class of the K-class problems")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--attacks", nargs="*", default=["badnets", "blended", "wanet", "sig"])
    parser.add_argument("--quickstart", nargs="*", default=[], help="quickstart run folders (backdoored, clean)")
    parser.add_argument("--verdicts_first", action="store_true", help="measure the verdicts before the scaling")
    parser.add_argument("--budget", type=int, default=10, help="unseen images per class of the verdict runs")
    parser.add_argument("--modes", nargs="+", default=["exhaustive", "prescreened"],
                        choices=["exhaustive", "prescreened"], help="the estimations of part 3")
    parser.add_argument("--prescreen_steps", type=int, default=20, help="part 3's pre-screen (from 16 classes)")
    parser.add_argument("--many_classes", type=int, default=0, metavar="STEPS",
                        help="part 3: train a backdoored and a clean 40-class model for STEPS steps each (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="runs")
    parser.add_argument("--cifar_root", default="../shared/data/cifar10")
    parser.add_argument("--cache_dir", default="runs/cache")
    parser.add_argument("--out", default="runs/bench/estimation-scaling/scaling.json")
    parser.add_argument("--table_only", action="store_true", help="only print the tables of the rows in --out")
    args = parser.parse_args()
    if args.table_only:
        result = json.loads(Path(args.out).read_text())
        print(tables(result))
        if result["scaling"]:
            plot(result, Path(args.out).with_suffix(".png"))
        return
    if max(args.classes, default=0) > 10 * ROTATIONS:
        raise SystemExit(f"--classes: at most {10 * ROTATIONS} (10 classes x {ROTATIONS} rotations)")
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"settings": vars(args), "scaling": [], "verdicts": [], "many_classes": []}
    save = lambda: atomic_json(result, args.out)  # noqa: E731 (every finished row is kept if a later one fails)
    parts = [lambda: scaling(args, result["scaling"], save) if args.classes else None,
             lambda: verdicts(args, result["verdicts"], save)]
    for part in reversed(parts) if args.verdicts_first else parts:
        part()
    if args.many_classes:
        many_classes(args, result["many_classes"], save)
    print(tables(result))
    if result["scaling"]:
        plot(result, Path(args.out).with_suffix(".png"))
    print(f"rows: {args.out}")


if __name__ == "__main__":
    main()
