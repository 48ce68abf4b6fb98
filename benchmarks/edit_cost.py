"""The edit's cost against its floor: seconds and peak memory of ``ActivationEditing`` (trigger known, one layer,
λ fixed, repair on) against the number of unseen images and the edited layer's key width, in float32 and bf16.

    python benchmarks/edit_cost.py --out runs/bench/edit-cost/cost.json

Part 1, images: the CIFAR-10 BadNets run with 250 unseen images per class (``train_cifar10.sh`` makes
``runs/cifar10-badnets-u250``), its last conv ``blocks.2.conv2`` (keys of 2,304 = 256 x 3 x 3 values), N = 10 …
2,500 unseen images. Beside each edit, the floor of any method of this kind: one clean and one triggered forward
pass over the same images in the same precision. The bf16 edit's key moments against the float32 ones (relative
Frobenius error), and the test split's CA / ASR / TA after either edit with the ASR of the trigger's mirror image
and of its worst move (reported, never used to choose). The "mapped floor" beside it: one clean pass and one pass
per trigger the edit mapped, over the images it applies each to (the triggers it adds itself, the mirror image and
the moves, on at most ``ADDED_TRIGGER_IMAGES`` of them).

Part 2, key width: 1,000 images through layers whose keys hold 512 … 4,608 values: the compact net's
``blocks.2.conv1`` (1,152) and ``blocks.2.conv2`` (2,304), PreAct-ResNet18's head ``linear`` (512),
``layer4.0.conv1`` (2,304) and ``layer4.1.conv2`` (4,608). PreAct weights come from ``--preact`` when given,
else from a fresh initialisation: seconds and memory depend on shapes only.

Part 3, ``--forms`` (run on its own; the other parts' rows in --out are kept): the float32 edits of part 1's model
solved in the span of U's keys (what the defense does where they are at most as many as the key width) and from the
d x d moments, side by side; and the first classifier layer of a torchvision VGG-16-BN (25,088 values per key).

Seconds are the median of ``--repeats`` runs after one warm-up; in parts 1 and 2 each edit and its floor run in
alternation (edit, floor, edit, floor, ...) and the ratio is the median of the pairs' ratios, with their range: on
a machine whose speed drifts between runs both members of a pair drift alike. Peak memory is the largest
allocation sampled every 5 ms during the edit, less what was allocated before it: glibc's own count of bytes in use
(``mallinfo2``), which, unlike the resident set, falls when tensors are freed, so each edit is measured on its own.
Linux with glibc >= 2.33; needs an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_backdoor.data.poisoning import apply_trigger, to_float
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData, activation_editing
from lightning_backdoor.defenses.report import augmented_asr
from lightning_backdoor.evaluation import evaluate, in_batches
from lightning_backdoor.io import atomic_json
from lightning_backdoor.models import build_model
from lightning_backdoor.provenance import environment
from lightning_backdoor.runs import instantiate_run, run_checkpoint
from lightning_backdoor.triggers import augmentation_images

PRECISIONS = {"float32": False, "bf16": True}


class MallocInfo(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = MallocInfo


def allocated_bytes() -> int:
    """Bytes this process holds from malloc now: in the heap arenas plus in mmapped blocks (torch's CPU tensors)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_memory(work: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``work`` while a thread samples the allocated bytes every 5 ms; returns its result and the peak rise in
    bytes over what was allocated before it."""
    before, peak, done = allocated_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], allocated_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], allocated_bytes()) - before


def median_seconds(work: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``work`` after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_seconds(work: Callable[[], Any], floor: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Wall times of ``work`` and of its ``floor`` measured in alternation (work, floor, work, floor, ...) after one
    warm-up call of each, so that both see the same machine state: their medians, and the median and range of the
    per-pair ratios work / floor (a drifting machine moves both members of a pair alike)."""
    work(), floor()
    pairs = []
    for _ in range(repeats):
        pair = []
        for call in (work, floor):
            start = time.perf_counter()
            call()
            pair.append(time.perf_counter() - start)
        pairs.append(pair)
    ratios = [seconds / floor_seconds for seconds, floor_seconds in pairs]
    return {"seconds": statistics.median(pair[0] for pair in pairs),
            "floor_seconds": statistics.median(pair[1] for pair in pairs), "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "pairs": pairs}


@torch.no_grad()
def forward_floor(network: nn.Module, images: Tensor, triggered: Tensor, bf16: bool,
                  more: list[Tensor] | tuple[Tensor, ...] = ()) -> None:
    """One clean and one triggered forward pass over the images, in chunks of 500, as the edit's captures run;
    one more pass per tensor of ``more`` (the other triggers' images)."""
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for batch in (*images.split(500), *triggered.split(500), *(chunk for extra in more
                                                                   for chunk in extra.split(500))):
            network(batch)


def mapped_triggers(knowledge: BackdoorKnowledge, details: dict[str, Any]) -> list[Any]:
    """The triggers an edit mapped to clean values, from its report: the knowledge's, then the mirror images and
    the moves it added (``mirrored_triggers`` / ``shifted_triggers`` marked ``included``), in that order."""
    from lightning_backdoor.triggers import Mirrored, Shifted

    triggers = list(knowledge.triggers)
    mirrors = [Mirrored(triggers[entry["trigger"]]) for entry in details.get("mirrored_triggers", [])
               if entry["included"]]
    moves = [Shifted(Mirrored(triggers[0]) if entry["mirrored"] else triggers[0], tuple(entry["shift"]))
             for entry in details.get("shifted_triggers", []) if entry["included"]]
    return triggers + mirrors + moves


def edit(network: nn.Module, layer: str, unseen: UnseenData, knowledge: BackdoorKnowledge, bf16: bool,
         seed: int, strength: float | None = 10.0) -> tuple[nn.Module, dict[str, Any]]:
    """The default edit (λ = 10, repair on) of a copy of ``network`` at ``layer``; the copy and the result's details
    with the edited ``layer``."""
    model = copy.deepcopy(network)
    result = ActivationEditing(layer=layer, bf16=bf16, seed=seed, strength=strength).defend(model, unseen, knowledge)
    return model, {**result.details, "layer": result.layer}


def moment_errors(network: nn.Module, layer: str, unseen: UnseenData, knowledge: BackdoorKnowledge,
                  seed: int) -> dict[str, float]:
    """Relative Frobenius error of the bf16 key statistics (A, R, C) and of the edit ΔW against float32 (the moments
    form, whatever the number of keys)."""
    with key_space_ratio(0.0):
        fits = {bf16: ActivationEditing(layer=layer, bf16=bf16, seed=seed).fit(copy.deepcopy(network), unseen,
                                                                              knowledge) for bf16 in (False, True)}
    relative = lambda ours, exact: ((ours - exact).norm() / exact.norm().clamp(min=1e-12)).item()  # noqa: E731
    exact, rounded = fits[False].problem, fits[True].problem
    errors = {name: relative(getattr(rounded, field), getattr(exact, field))
              for name, field in (("A", "triggered_moment"), ("R", "residual_moment"), ("C", "clean_moment"))}
    deltas = [fit.problem.solve("closed_form", fit.strength, 16) for fit in (fits[False], fits[True])]
    errors["delta_W"] = relative(deltas[1], deltas[0])
    return errors


def badnets_run(args: argparse.Namespace) -> tuple[nn.Module, Any, BackdoorKnowledge, tuple[Tensor, ...] | None]:
    """The BadNets run of ``--run`` (float32, eval mode), its data module, the trigger known, and the test split's
    tensors (``None`` without ``--test``)."""
    configs = ["configs/cifar10/base.yaml", "configs/cifar10/badnets.yaml"]
    module, data = instantiate_run(configs, run_checkpoint(Path(args.run)),
                                   [f"--data.init_args.unseen_per_class={args.unseen_per_class}"])
    knowledge = BackdoorKnowledge.of(data.trigger, data.target_class)
    return module.net.float().eval(), data, knowledge, data.test_dataset().tensors if args.test else None


def images_part(args: argparse.Namespace, save: Callable[[], None], rows: list[dict[str, Any]]) -> None:
    network, data, knowledge, test = badnets_run(args)
    mirrored, moves = augmentation_images(data.trigger, to_float(data.unseen_set(1, 0).images))
    for count in args.images:
        unseen_set = data.unseen_set(count // data.num_classes, args.seed)
        unseen = UnseenData(to_float(unseen_set.images), unseen_set.labels)
        triggered = apply_trigger(data.trigger, unseen_set.images)
        row: dict[str, Any] = {"images": len(unseen.labels), "layer": args.layer}
        for name, bf16 in PRECISIONS.items():
            timing = paired_seconds(lambda: edit(network, args.layer, unseen, knowledge, bf16, args.seed),
                                    lambda: forward_floor(network, unseen.images, to_float(triggered), bf16),
                                    args.repeats)
            (model, details), memory = peak_memory(lambda: edit(network, args.layer, unseen, knowledge, bf16,
                                                                args.seed))
            mapped = mapped_triggers(knowledge, details)
            added = details.get("added_trigger_images", len(unseen_set.images))  # the added triggers' images
            known = len(knowledge.triggers)
            mapped_images = [to_float(apply_trigger(trigger, unseen_set.images[:added if index >= known else None]))
                             for index, trigger in enumerate(mapped) if index > 0]
            mapped_floor = median_seconds(lambda: forward_floor(network, unseen.images, to_float(triggered), bf16,
                                                                mapped_images), args.repeats)
            row[name] = {**timing, "peak_memory_mib": memory / 2**20, "system": details["system"],
                         "repaired": details.get("repair", {}).get("setting") is not None,
                         "triggers_mapped": len(mapped), "mapped_floor_seconds": mapped_floor,
                         "added_trigger_images": details.get("added_trigger_images")}
            if test is not None:
                row[name]["test"] = evaluate(model, *test, data.num_classes, data.target_class, bf16=True) | \
                    augmented_asr(model, mirrored, moves, data.target_class, in_batches(*test[:2]), bf16=True)
        row["bf16_errors"] = moment_errors(network, args.layer, unseen, knowledge, args.seed)
        rows.append(row)
        save()
        print(line(row), flush=True)


def width_part(args: argparse.Namespace, save: Callable[[], None], rows: list[dict[str, Any]]) -> None:
    configs = ["configs/cifar10/base.yaml", "configs/cifar10/badnets.yaml"]
    module, data = instantiate_run(configs, run_checkpoint(Path(args.run)),
                                   [f"--data.init_args.unseen_per_class={args.unseen_per_class}"])
    compact = module.net.float().eval()
    preact = build_model("preact_resnet18", num_classes=10, in_channels=3).float().eval()
    if args.preact:
        preact_module, _ = instantiate_run([*configs, "configs/cifar10/preact_resnet18.yaml"], args.preact)
        preact = preact_module.net.float().eval()
    unseen_set = data.unseen_set(args.width_images // data.num_classes, args.seed)
    unseen = UnseenData(to_float(unseen_set.images), unseen_set.labels)
    knowledge = BackdoorKnowledge.of(data.trigger, data.target_class)
    triggered = to_float(apply_trigger(data.trigger, unseen_set.images))
    for model_name, network, layer in (("preact_resnet18", preact, "linear"), ("compact", compact, "blocks.2.conv1"),
                                       ("compact", compact, "blocks.2.conv2"),
                                       ("preact_resnet18", preact, "layer4.0.conv1"),
                                       ("preact_resnet18", preact, "layer4.1.conv2")):
        weight = network.get_submodule(layer).weight
        row: dict[str, Any] = {"model": model_name, "layer": layer, "key_width": weight[0].numel(),
                               "images": len(unseen.labels), "trained_weights": model_name == "compact"
                               or bool(args.preact)}
        for name, bf16 in PRECISIONS.items():
            timing = paired_seconds(lambda: edit(network, layer, unseen, knowledge, bf16, args.seed),
                                    lambda: forward_floor(network, unseen.images, triggered, bf16), args.repeats)
            (_, details), memory = peak_memory(lambda: edit(network, layer, unseen, knowledge, bf16, args.seed))
            row[name] = {**timing, "peak_memory_mib": memory / 2**20,
                         "keys": details["diagnostics"]["num_triggered_keys"]}
        rows.append(row)
        save()
        print(f"{model_name} {layer} d={row['key_width']}: " + ", ".join(
            f"{name} {row[name]['seconds']:.2f} s (floor {row[name]['floor_seconds']:.2f} s), "
            f"{row[name]['peak_memory_mib']:.0f} MiB" for name in PRECISIONS), flush=True)


@contextmanager
def key_space_ratio(ratio: float) -> Iterator[None]:
    """The edit's :data:`~lightning_backdoor.defenses.activation_editing.KEY_SPACE_RATIO` set to ``ratio`` (0: the
    moments form everywhere) while inside."""
    kept = activation_editing.KEY_SPACE_RATIO
    activation_editing.KEY_SPACE_RATIO = ratio
    try:
        yield
    finally:
        activation_editing.KEY_SPACE_RATIO = kept


#: part 3's cases: unseen images, layer, λ (None: chosen with the layer by the cross-validation on U), and whether
#: the key-space form is forced where it would not be chosen (more keys than the key width)
FORM_CASES = ((10, "blocks.2.conv2", 10.0, False), (50, "blocks.2.conv2", 10.0, False),
              (100, "blocks.2.conv2", 10.0, False), (250, "blocks.2.conv2", 10.0, True), (10, "auto", None, False),
              (100, "auto", None, False))


def forms_part(args: argparse.Namespace, save: Callable[[], None], rows: list[dict[str, Any]]) -> None:
    """The same float32 edits solved in the span of the keys (the default where they are at most as many as the
    key width) and from the d x d moments: seconds, the weights' difference and the test split's figures; then the
    first classifier layer (25,088 values per key) of a torchvision VGG-16-BN, freshly initialised, on 100 images."""
    network, data, knowledge, test = badnets_run(args)
    for count, layer, strength, forced in FORM_CASES:
        unseen_set = data.unseen_set(count // data.num_classes, args.seed)
        unseen = UnseenData(to_float(unseen_set.images), unseen_set.labels)
        row: dict[str, Any] = {"images": count, "layer": layer, "strength": strength, "forced": forced}
        weights = {}
        for form, ratio in (("key_space", 1e9 if forced else activation_editing.KEY_SPACE_RATIO), ("moments", 0.0)):
            with key_space_ratio(ratio):
                seconds = median_seconds(lambda: edit(network, layer, unseen, knowledge, False, args.seed, strength),
                                         args.repeats)
                model, details = edit(network, layer, unseen, knowledge, False, args.seed, strength)
            weights[form] = model.get_submodule(details["layer"]).weight
            row[form] = {"seconds": seconds, "system": details["system"], "layer": details["layer"],
                         "strength": details["strength"]}
            if test is not None:
                row[form]["test"] = evaluate(model, *test, data.num_classes, data.target_class, bf16=True)
        edited = {form: weights[form].detach() for form in weights}
        change = (edited["moments"] - network.get_submodule(row["moments"]["layer"]).weight).norm()
        row["weight_difference"] = ((edited["key_space"] - edited["moments"]).norm() / change).item()
        rows.append(row)
        save()
        print(f"forms N={count} {layer}: " + ", ".join(f"{form} {row[form]['seconds']:.2f} s {row[form]['system']}"
                                                    for form in ("key_space", "moments")), flush=True)
    import torchvision

    torch.manual_seed(args.seed)
    vgg = torchvision.models.vgg16_bn(num_classes=data.num_classes).eval()
    unseen_set = data.unseen_set(100 // data.num_classes, args.seed)
    unseen = UnseenData(to_float(unseen_set.images), unseen_set.labels)
    seconds = median_seconds(lambda: edit(vgg, "classifier.0", unseen, knowledge, False, args.seed), args.repeats)
    (_, details), memory = peak_memory(lambda: edit(vgg, "classifier.0", unseen, knowledge, False, args.seed))
    rows.append({"model": "torchvision vgg16_bn (untrained)", "layer": "classifier.0", "images": len(unseen.labels),
                 "key_width": vgg.get_submodule("classifier.0").weight.shape[1], "seconds": seconds,
                 "peak_memory_mib": memory / 2**20, "system": details["system"]})
    save()
    print(f"vgg16_bn classifier.0: {seconds:.2f} s, {memory / 2**20:.0f} MiB, {details['system']}", flush=True)


def line(row: dict[str, Any]) -> str:
    parts = [f"N={row['images']}"]
    for name in PRECISIONS:
        value = row[name]
        parts.append(f"{name}: {value['seconds']:.2f} s (floor {value['floor_seconds']:.2f} s, x{ratio(value)}, "
                     f"{value['peak_memory_mib']:.0f} MiB{mapped(value)})")
    errors = row["bf16_errors"]
    parts.append("bf16 error " + " ".join(f"{key} {value:.1e}" for key, value in errors.items()))
    return "; ".join(parts)


def mapped(value: dict[str, Any]) -> str:
    """The triggers the edit mapped and its ratio to their floor (a clean pass and one pass per trigger), where the
    row records them."""
    if "mapped_floor_seconds" not in value:
        return ""
    return (f"; {value['triggers_mapped']} triggers mapped, their floor {value['mapped_floor_seconds']:.2f} s, "
            f"x{value['seconds'] / value['mapped_floor_seconds']:.2f}")


def mapped_cell(f32: dict[str, Any], b16: dict[str, Any]) -> str:
    """The mapped triggers' floor in both precisions with the edit's ratio to it ("–" for rows without it)."""
    if "mapped_floor_seconds" not in f32:
        return "–"
    return " / ".join(f"{value['mapped_floor_seconds']:.2f} ({value['seconds'] / value['mapped_floor_seconds']:.2f})"
                      for value in (f32, b16))


def augmented(test: dict[str, float]) -> str:
    """" (mirrored / moved ASR)" in % where the test figures hold them."""
    if "mirrored_asr" not in test and "moved_asr" not in test:
        return ""
    return " (" + " / ".join(f"{100 * test[key]:.2f}" if key in test else "–"
                             for key in ("mirrored_asr", "moved_asr")) + ")"


def ratio(value: dict[str, Any]) -> str:
    """The median ratio to the floor, with the range of the pairs' ratios where they were measured in pairs."""
    low, high = value.get("ratio_range", (None, None))
    return f"{value['ratio']:.2f}" + (f" ({low:.2f}–{high:.2f})" if low is not None else "")


def tables(result: dict[str, Any]) -> str:
    lines = ["| unseen images | float32 edit s | float32 floor s | ratio (range) | bf16 edit s | bf16 floor s "
             "| ratio (range) "
             "| peak MiB f32 / bf16 | bf16 rel. error A / C / ΔW | test CA / ASR / TA f32 | test CA / ASR / TA bf16 "
             "| triggers mapped | mapped floor s f32 / bf16 (ratio) |",
             "|" + " --- |" * 13]
    for row in result["images"]:
        f32, b16, errors = row["float32"], row["bf16"], row["bf16_errors"]
        effect = lambda value: (" / ".join(f"{100 * value['test'][key]:.2f}"  # noqa: E731
                                           for key in ("clean_acc", "asr", "target_acc")) + augmented(value['test'])
                                if "test" in value else "–")
        lines.append(f"| {row['images']} | {f32['seconds']:.2f} | {f32['floor_seconds']:.2f} | {ratio(f32)} | "
                     f"{b16['seconds']:.2f} | {b16['floor_seconds']:.2f} | {ratio(b16)} | "
                     f"{f32['peak_memory_mib']:.0f} / {b16['peak_memory_mib']:.0f} | {errors['A']:.1e} / "
                     f"{errors['C']:.1e} / {errors['delta_W']:.1e} | {effect(f32)} | {effect(b16)} | "
                     f"{f32.get('triggers_mapped', '–')} | {mapped_cell(f32, b16)} |")
    lines += ["", "| model | layer | key width | keys | float32 s (floor) | bf16 s (floor) | peak MiB float32 "
              "| peak MiB bf16 |", "|" + " --- |" * 8]
    floor = lambda value: f" ({value['floor_seconds']:.2f})" if "floor_seconds" in value else ""  # noqa: E731
    for row in sorted(result["width"], key=lambda row: row["key_width"]):
        lines.append(f"| {row['model']}{'' if row['trained_weights'] else ' (untrained)'} | `{row['layer']}` | "
                     f"{row['key_width']} | {row['float32']['keys']} | {row['float32']['seconds']:.2f}"
                     f"{floor(row['float32'])} | {row['bf16']['seconds']:.2f}{floor(row['bf16'])} | "
                     f"{row['float32']['peak_memory_mib']:.0f} | {row['bf16']['peak_memory_mib']:.0f} |")
    if result.get("forms"):
        lines += ["", "| unseen images | layer | λ | key space s (system) | moments s (system) | weights apart "
                  "| test CA / ASR / TA key space | test CA / ASR / TA moments |", "|" + " --- |" * 8]
        effect = lambda value: (" / ".join(f"{100 * value['test'][key]:.2f}"  # noqa: E731
                                           for key in ("clean_acc", "asr", "target_acc")) if "test" in value else "–")
        system = lambda value: f"{value['system']['form']} {value['system']['size']}"  # noqa: E731
        for row in result["forms"]:
            if "key_space" not in row:
                lines.append(f"| {row['images']} | `{row['layer']}` of {row['model']}, d = {row['key_width']} | 10 "
                             f"| {row['seconds']:.2f} ({system(row)}), {row['peak_memory_mib']:.0f} MiB | – | – | – "
                             f"| – |")
                continue
            chosen = row["key_space"]
            layer = f"auto → `{chosen['layer']}`" if row["layer"] == "auto" else f"`{row['layer']}`"
            strength = row["strength"] if row["strength"] is not None else f"CV → {chosen['strength']}"
            if row.get("forced"):
                layer += " (key space forced)"
            lines.append(f"| {row['images']} | {layer} | {strength} | {chosen['seconds']:.2f} ({system(chosen)}) | "
                         f"{row['moments']['seconds']:.2f} ({system(row['moments'])}) | "
                         f"{row['weight_difference']:.1e} | {effect(chosen)} | {effect(row['moments'])} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Edit seconds and the floor against N, and (where part 2's rows exist) edit seconds against key width, as one
    PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = sorted(result["width"], key=lambda row: row["key_width"])
    figure, axes = plt.subplots(1, 2 if rows else 1, figsize=(11 if rows else 5.5, 4), squeeze=False)
    left = axes[0][0]
    counts = [row["images"] for row in result["images"]]
    for name, style in (("float32", "-"), ("bf16", "--")):
        left.plot(counts, [row[name]["seconds"] for row in result["images"]], "o" + style, label=f"edit, {name}")
        left.plot(counts, [row[name]["floor_seconds"] for row in result["images"]], "s" + style,
                  label=f"2 forward passes, {name}")
    left.set(xscale="log", yscale="log", xlabel="unseen images", ylabel="seconds",
             title="edit vs its floor (compact, blocks.2.conv2)")
    left.legend(fontsize=8)
    if rows:  # part 2's rows, where --out holds them
        draw_widths(axes[0][1], rows)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def draw_widths(right: Any, rows: list[dict[str, Any]]) -> None:
    """Edit seconds against the key width, one point per part 2 row, on the axes ``right``."""
    for name, style in (("float32", "o-"), ("bf16", "o--")):
        right.plot([row["key_width"] for row in rows], [row[name]["seconds"] for row in rows], style, label=name)
    for row in rows:
        right.annotate(f"{row['layer']} ({row['float32']['keys']} keys)", (row["key_width"], row["float32"]["seconds"]),
                       fontsize=7)
    right.set(xlabel="key width d", ylabel="seconds", title=f"edit vs key width ({rows[0]['images']} images)")
    right.legend(fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/cifar10-badnets-u250")
    parser.add_argument("--unseen_per_class", type=int, default=250, help="the run's unseen split per class")
    parser.add_argument("--layer", default="blocks.2.conv2")
    parser.add_argument("--images", nargs="*", type=int, default=[10, 50, 100, 250, 500, 1000, 2500],
                        help="part 1 sizes; none: skip part 1 (its rows in --out are kept)")
    parser.add_argument("--width_images", type=int, default=1000)
    parser.add_argument("--no_width", action="store_true", help="skip part 2 (its rows in --out are kept)")
    parser.add_argument("--forms", action="store_true",
                        help="run only part 3: the key-space and moments forms side by side (parts 1-2 kept)")
    parser.add_argument("--preact", default=None, help="a PreAct-ResNet18 BadNets checkpoint (else untrained)")
    parser.add_argument("--test", action=argparse.BooleanOptionalAction, default=True,
                        help="report the test split's CA/ASR/TA after each edit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/edit-cost/cost.json")
    parser.add_argument("--table_only", action="store_true", help="print the tables of --out and redraw its PNG")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.table_only:
        torch.set_num_threads(args.threads)
        result: dict[str, Any] = {"settings": vars(args), "torch": torch.__version__,
                                  "threads": torch.get_num_threads(), "environment": environment(), "images": [],
                                  "width": []}
        kept = json.loads(out.read_text()) if out.is_file() else {}
        save = lambda: atomic_json(result, out)  # noqa: E731
        result["forms"] = kept.get("forms", [])
        if args.forms:
            result["images"], result["width"], result["forms"] = kept.get("images", []), kept.get("width", []), []
            forms_part(args, save, result["forms"])
        elif args.images:
            images_part(args, save, result["images"])
        else:  # part 1 not run (--images with no sizes): its rows in --out are kept
            result["images"] = kept.get("images", [])
        if args.forms:
            pass
        elif args.no_width:
            result["width"] = kept.get("width", [])
        else:
            width_part(args, save, result["width"])
    result = json.loads(out.read_text())
    print(tables(result))
    if result["images"]:
        plot(result, out.with_suffix(".png"))
        print(f"plot: {out.with_suffix('.png')}")
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
