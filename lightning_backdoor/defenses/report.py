"""Run a defense between two evaluations on the test split (:func:`run_defense` -> :class:`DefenseReport`, no I/O),
whose files ``lightning_backdoor.defenses.outputs`` writes."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_backdoor.data.poisoning import attack_labels as make_attack_labels
from lightning_backdoor.defenses.activation_editing import REPAIR_TOLERANCE
from lightning_backdoor.defenses.base import BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.editing import JitterWarning
from lightning_backdoor.defenses.stages import StageVersions
from lightning_backdoor.evaluation import EVAL_BATCH_SIZE, EvalBatch, Forward, evaluate_versions, in_batches
from lightning_backdoor.metrics import AttackSuccessRate, defense_effectiveness_rating
from lightning_backdoor.provenance import environment
from lightning_backdoor.triggers import Trigger, augmentation_images, crop_distance

#: A model whose accuracy is this likely (or likelier) under guessing is not told apart from chance.
CHANCE_P_VALUE = 0.01
#: ... nor is one that covers less than this fraction of the way from chance (1/K) to 100 %.
CHANCE_MARGIN = 0.1
#: The stages of a defense report, by key, with their titles in tables and plots.
STAGE_TITLES = {"before": "before", "after_edit": "after edit", "after": "after repair"}
#: Titles of the report's metrics in tables and plots.
METRIC_TITLES = {"clean_acc": "CA", "asr": "ASR", "asr_floor": "ASR floor", "robust_acc": "RA", "target_acc": "TA",
                 "mirrored_asr": "mirrored ASR", "moved_asr": "moved ASR", "estimated_asr": "estimated trigger's ASR"}
#: Stage metrics besides ``METRIC_NAMES``, each where it was measured: the test trigger's mirror image's ASR, the
#: largest ASR of its moves by a crop, and the estimated trigger's when the true ASR could not be measured.
EXTRA_METRICS = ("mirrored_asr", "moved_asr", "estimated_asr")


@dataclass
class TestData:
    """The test split a defense is evaluated on, read in batches: nothing but the current batch is held, so a loader
    that decodes each batch keeps memory flat however large the split.

    Attributes:
        batches: re-iterable (each pass yields the whole split, in the same order) batches ``(images, labels)`` or
            ``(images, labels, triggered images, attack labels)``: images (B, C, H, W) uint8 or float pixels in
            [0, 1], labels (B,) int64, attack labels (B,) int64 (``-1``: not attacked); without the triggered half
            the true ASR is not measured. E.g. a DataLoader, or :func:`~lightning_backdoor.evaluation.in_batches`.
        num_images: N, the images in one pass.
        num_classes: K.
        target_class: the true target class (``None``: all-to-all or unknown; then no target-class accuracy).
        classes: the K labels' names, in label order, for the warnings (``None``: labels by index only).
        trigger: the trigger the triggered half carries, when known: the ASR of its mirror image is measured too
            (``mirrored_asr``; a model trained with random flips learns it, see ``triggers.Mirrored``), and for a
            local trigger the largest ASR of it and its mirror image moved by a crop (``moved_asr``; moves of
            :func:`~lightning_backdoor.triggers.crop_distance` pixels, see ``triggers.Shifted``).
    """

    batches: Iterable[EvalBatch]
    num_images: int
    num_classes: int
    target_class: int | None = None
    classes: Sequence[str] | None = None
    trigger: Trigger | None = None

    @classmethod
    def from_tensors(cls, images: Tensor, labels: Tensor, triggered: Tensor | None, attack_labels: Tensor | None,
                     num_classes: int, target_class: int | None = None,
                     batch_size: int = EVAL_BATCH_SIZE) -> TestData:
        """Tensors held in memory (images (N, C, H, W), labels (N,), their triggered versions and attack labels, or
        ``None`` for both), read ``batch_size`` at a time."""
        return cls(in_batches(images, labels, triggered, attack_labels, batch_size), len(labels), num_classes,
                   target_class)

    @classmethod
    def from_clean(cls, images: Tensor, labels: Tensor, trigger: Trigger | None, target_class: int | None,
                   num_classes: int) -> TestData:
        """Clean tensors (images (N, C, H, W) uint8 or float in [0, 1], labels (N,)), the triggered half built with a
        known trigger (all-to-one to ``target_class``); none without a trigger or target."""
        if trigger is None or target_class is None:
            return cls.from_tensors(images, labels, None, None, num_classes, target_class)
        floats = images.float() / 255 if images.dtype == torch.uint8 else images
        return replace(cls.from_tensors(images, labels, trigger(floats),
                                        make_attack_labels(labels, target_class, False, num_classes), num_classes,
                                        target_class), trigger=trigger)

    @classmethod
    def from_loader(cls, loader: DataLoader, num_classes: int, target_class: int | None,
                    trigger: Trigger | None = None) -> TestData:
        """A DataLoader over a sized dataset yielding the batches described above (e.g. ``PoisonedDataModule``'s
        ``test_dataloader()``, which decodes each batch when streaming), and the trigger of its triggered half."""
        return cls(loader, len(loader.dataset), num_classes, target_class, trigger=trigger)  # type: ignore[arg-type]


def near_chance(correct: int, total: int, num_classes: int) -> bool:
    """Whether ``correct`` right answers out of ``total`` are indistinguishable from, or barely above, guessing among
    ``num_classes`` classes.

    Two rules, either suffices: (1) the one-sided exact binomial test against guessing, P(X >= correct) for
    X ~ Binomial(total, 1/K), is above ``CHANCE_P_VALUE`` (1 %): a guessing model passes it less than once in a
    hundred, while a model right on 90 % of 10 images fails it with probability below 0.2 %; on 50 images of
    10 classes it needs 11 right (22 %); (2) the accuracy covers less than ``CHANCE_MARGIN`` (a tenth) of the way
    from 1/K to 100 % (19 % for 10 classes, 55 % for 2): on thousands of test images the test alone would call 11 %
    "above chance".
    """
    if total <= 0 or num_classes < 2:
        return False
    chance = 1 / num_classes
    if correct / total < chance + CHANCE_MARGIN * (1 - chance):
        return True
    return binomial_tail(correct, total, chance) > CHANCE_P_VALUE


def binomial_tail(hits: int, total: int, probability: float) -> float:
    """P(X >= ``hits``) for X ~ Binomial(``total``, ``probability``), exact (summed in log space)."""
    counts = torch.arange(hits, total + 1, dtype=torch.float64)
    log_probabilities = torch.distributions.Binomial(total, torch.tensor(probability, dtype=torch.float64)).log_prob(
        counts)
    return log_probabilities.logsumexp(0).exp().item()


#: ASR above its floor, a fraction, past which a defended model's backdoor counts as reduced rather than removed: the
#: goals of the field's tables sit within 1-2 pt of the floor (docs/method.md)
ASR_LEFT_WARNING = 0.05
#: ASR before the defense, a fraction, below which the test trigger counts as working on part of the images only:
#: the learned backdoors of docs/results reach 88-100 %
PARTIAL_ASR_WARNING = 0.5


def backdoor_left(before: dict[str, float], after: dict[str, float], details: dict[str, Any] | None = None,
                  method: str = "editing") -> str | None:
    """A warning when the defended model's ASR stays more than :data:`ASR_LEFT_WARNING` above its ASR floor, on a
    model whose backdoor worked (ASR above its floor by as much before); ``None`` otherwise. ``before``/``after``: the
    test split's metrics (fractions) with ``asr`` and ``asr_floor``; ``details`` (the defense result's) and
    ``method`` say what was tried, so that the advice names only what was not: for the edit, ``layer auto`` unless
    it chose among layers, ``strength null`` unless it chose among strengths; with the trigger unknown, that the
    estimated trigger may be the limit."""
    if "asr_floor" not in after or "asr_floor" not in before:
        return None
    left, worked = after["asr"] - after["asr_floor"], before["asr"] - before["asr_floor"]
    if left <= ASR_LEFT_WARNING or worked <= ASR_LEFT_WARNING:
        return None
    if method.endswith("/no_backdoor_found"):  # EstimateFirst left the model as it was
        return (f"the trigger estimation found no backdoor and left the model unchanged, but the test trigger still "
                f"succeeds: ASR {100 * after['asr']:.1f} % against a floor of {100 * after['asr_floor']:.1f} % on the "
                f"test images: the backdoor was missed; defend with the trigger known if you have it")
    details = details or {}
    options = ["more unseen images"]
    if method.startswith("editing"):
        scored = [key.split(" λ=") for key in details.get("selection", {}).get("cross_validated_loss_on_unseen", {})]
        if len({pair[0] for pair in scored}) < 2:
            options.append("layer auto")
        if len({pair[-1].split()[0] for pair in scored if len(pair) == 2}) < 2:
            options.append("strength null (chosen on the unseen split)")
    advice = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"
    unknown = ("; the trigger was estimated, and an estimate may remove less than the true trigger: defend with the "
               "trigger known if you have it") if details.get("trigger_known") is False else ""
    return (f"the backdoor is reduced, not removed: ASR {100 * after['asr']:.1f} % is {100 * left:.1f} pt above its "
            f"floor ({100 * after['asr_floor']:.1f} %) on the test images; {advice} may remove more{unknown}")


def _still_succeeds(after: dict[str, float], metric: str, what: str, why: str) -> str | None:
    """The start of a warning that ``what`` still succeeds after the defense: ``after[metric]`` more than
    :data:`ASR_LEFT_WARNING` above the floor; ``None`` when it is not, or either was not measured."""
    if metric not in after or "asr_floor" not in after:
        return None
    left, floor = after[metric], after["asr_floor"]
    if left <= floor + ASR_LEFT_WARNING:
        return None
    return (f"{what} still succeeds on {100 * left:.1f} % of the test images not of the target class after the "
            f"defense (floor {100 * floor:.1f} %): {why}, and an attacker can use it; ")


def mirror_left(after: dict[str, float], details: dict[str, Any] | None = None, method: str = "editing"
                ) -> str | None:
    """A warning when the test trigger's mirror image still succeeds after the defense (more than
    :data:`ASR_LEFT_WARNING` above the floor): the model learnt it from training with random flips, and an attacker
    can use it as well as the trigger. The advice depends on whether the edit included it (``details``'
    ``mirrored_triggers``; ``method``: the defense's, whose advice names the edit's options only when it is the
    edit). ``None`` otherwise, or when it was not measured."""
    line = _still_succeeds(after, "mirrored_asr", "the test trigger's mirror image (flipped left-right)",
                           "a model trained with random flips learns it too")
    if line is None:
        return None
    facts = (details or {}).get("mirrored_triggers", [])
    if any(fact["included"] for fact in facts):
        return line + "the edit mapped it to clean values too, and reduced it only: more unseen images may remove more"
    if facts:
        measured = ", ".join(f"{100 * fact['success_on_unseen']:.0f} %" for fact in facts
                             if fact["success_on_unseen"] is not None)
        return line + (f"it was left out of the edit, as it worked on {measured} of the unseen images only (below "
                       f"50 %): edit with mirror: true (defend: --defense.mirror true)")
    if not method.startswith("editing"):
        return line + "this defense did not remove it"
    return line + "edit with mirror: true (ActivationEditing; defend: --defense.mirror true; its default, null, " \
                  "adds it when it works on the unseen images)"


def moved_left(after: dict[str, float], distance: int, details: dict[str, Any] | None = None,
               method: str = "editing") -> str | None:
    """A warning when the test trigger (or its mirror image) moved by ``distance`` pixels, as a random crop of the
    training images moves it, still succeeds after the defense: ``moved_asr``, the largest over the moves, more than
    :data:`ASR_LEFT_WARNING` above the floor. The advice depends on what the edit did with the moves (``details``'
    ``shifted_triggers``; ``method`` as for :func:`mirror_left`). ``None`` otherwise, or when it was not measured."""
    line = _still_succeeds(after, "moved_asr", f"the test trigger moved by {distance} px (as a random crop of the "
                           f"training images moves it)", "a model trained with random crops learns it there too (and "
                           "one trained without may take a patch near the trigger's place for the trigger)")
    if line is None:
        return None
    details = details or {}
    facts = details.get("shifted_triggers", [])
    if any(fact["included"] for fact in facts):
        return line + ("the edit mapped the moves that worked on the unseen images to clean values too, and reduced "
                       "it only: more unseen images may remove more")
    if facts:
        largest = max(fact["success_on_unseen"] for fact in facts)
        return line + (f"the edit left the moves out, as none worked on 50 % of the unseen images (largest "
                       f"{100 * largest:.0f} %)")
    if not method.startswith("editing"):
        return line + "this defense did not remove it"
    if details.get("trigger_known") is False:
        return line + ("the trigger was estimated, and its main candidate is no local patch the edit could move: "
                       "defend with the trigger known if you have it")
    return line + ("edit with the moves: ActivationEditing's shift (defend: --defense.shift N; its default, null, "
                   "moves a local trigger by 1/8 of the image width; 0 turns the moves off)")


def trigger_inactive(before: dict[str, float], method: str = "editing") -> str | None:
    """A warning when the test trigger barely works on the model before the defense: its ASR within
    :data:`ASR_LEFT_WARNING` of its floor (``before``: the test split's metrics, fractions). Then the trigger or
    ``target_class`` is not the model's (a position, size or colour off), or the model holds no such backdoor, and
    the ASR after the defense says nothing about one. Above that but below :data:`PARTIAL_ASR_WARNING`, the trigger
    works on part of the images only: an approximation of the attacker's (a white square for a coloured one left the
    real trigger at 96 % while this one fell from 19 to 9 %), or a backdoor learned weakly. ``None`` otherwise (or
    without a test trigger). ``method``: what the defense did (the model was left unchanged when it ends in
    ``/no_backdoor_found``)."""
    if "asr_floor" not in before:
        return None
    measured = (f"ASR {100 * before['asr']:.1f} % against a floor of {100 * before['asr_floor']:.1f} % on the test "
                f"images")
    if before["asr"] - before["asr_floor"] > ASR_LEFT_WARNING:
        if before["asr"] >= PARTIAL_ASR_WARNING:
            return None
        return (f"the test trigger works on part of the images only before the defense: {measured} (learned "
                f"backdoors reach about 90 % or more): a backdoor learned weakly, or a trigger that approximates the "
                f"attacker's; then the defense removed what it describes and the attacker's may still work: describe "
                f"it exactly (pattern, mask, position), or estimate it (trigger_known=false)")
    done = ("the model was left unchanged" if method.endswith("/no_backdoor_found")
            else "the model was defended all the same")
    return (f"the test trigger barely works before the defense: {measured}; check the trigger and target_class "
            f"(position, size, colour) and the preprocessing (normalize), or the model holds no such backdoor; "
            f"{done}, and the ASR after it says nothing about a backdoor")


def repair_warning(details: dict[str, Any]) -> str | None:
    """A warning about the repair step (``details["repair"]`` of
    :class:`~lightning_backdoor.defenses.activation_editing.ActivationEditing`), ``None`` when there is none to give:
    the signal saw the edit hurt the target class but no setting was applied (none restored the held-out target
    images, or each that did gave the trigger back); or a forced repair (``repair_tolerance`` < 0, applied unjudged)
    failed the guard (its ``guard_passed``: the held-out triggered images' target confidence rose by more than the
    default tolerance or than it won back for the target images)."""
    repair, signal = details.get("repair"), details.get("repair_signal", {})
    if not repair or "drop" not in signal:
        return None
    if repair.get("forced"):
        if repair.get("guard_passed", True):
            return None
        setting = f"{repair['setting']:g}"
        default = (f"the signal's drop is within the default repair_tolerance ({REPAIR_TOLERANCE:g}), where no repair "
                   f"is tried" if signal["drop"] <= REPAIR_TOLERANCE else
                   f"at the default repair_tolerance ({REPAIR_TOLERANCE:g}) the guard refuses it")
        return (f"the forced repair ({repair['method']} {setting}, repair_tolerance < 0) raised the target-class "
                f"probability of held-out triggered unseen images by {repair['triggered_rise_with_repair'][setting]:.3f} "
                f"while winning back {signal['drop'] - repair['drop_with_repair'][setting]:.3f} for the held-out "
                f"target images: it may give the backdoor back (see ASR); {default}")
    if repair.get("setting") is not None:
        return None
    restoring = bool(repair.get("triggered_rise_with_repair"))  # rises are measured for restoring settings only
    why = ("each setting that restored them raised the triggered images' target confidence too (the repair would "
           "give the backdoor back)" if restoring else "no repair setting restored them")
    images = signal.get("held_out_target_images")
    measured = "" if not images else f" (measured on {images} image{'s' if images != 1 else ''}" + (
        ": so few make this check noisy)" if images < 10 else ")")
    return (f"the edit lowered the mean target-class probability of held-out unseen target images by "
            f"{signal['drop']:.3f}{measured} and {why}: the edit is kept unrepaired, and the target class may have lost "
            f"accuracy (see TA; without a test trigger, check target-class images you kept out of the unseen ones)")


def selection_line(layer: str | None, details: dict[str, Any]) -> str | None:
    """How ``layer: auto`` chose the edited ``layer``, in one line (``None`` where several layers were not scored),
    from a defense result's ``details``: the lowest cross-validated loss on the unseen split, its standard error,
    the layers within it and λ."""
    selection = details.get("selection", {})
    if "lowest" not in selection or layer is None:
        return None
    losses, within = selection["cross_validated_loss_on_unseen"], selection["layers_within_one_standard_error"]
    lowest = selection["lowest"]
    chosen = f"{layer} λ={details.get('strength')}"
    why = ("it had the lowest loss" if lowest.split(" ")[0] == layer else
           f"the deepest of {', '.join(within)}, within one standard error ({selection['standard_error']:.4f}) of "
           f"the lowest, {lowest} ({losses[lowest]:.4f})")
    loss = min(value for key, value in losses.items() if key.startswith(f"{layer} "))  # chosen at its lowest
    scored = {"attack_log_loss": ", triggered images scored by the attack's log-loss (one image per class)",
              "mixed": ", triggered images of a class in one fold only scored by the attack's log-loss"
              }.get(selection.get("triggered_loss"), "")
    return f"layer chosen by cross-validation on the unseen split: {chosen} (loss {loss:.4f}), {why}{scored}"


def estimation_line(details: dict[str, Any]) -> str | None:
    """The trigger estimation's verdict in one line (``None`` without one), from a defense result's ``details``:
    the target found, the estimators that flagged it with their anomaly index and size ratio, and the seconds; or
    "no backdoor found" with the largest index."""
    estimation = details.get("estimation")
    if not estimation:
        return None
    seconds = f"{estimation.get('seconds', 0.0):.1f} s"
    index, ratio = estimation.get("anomaly_index", {}), estimation.get("size_ratio", {})
    if not estimation.get("backdoor_found"):
        rule = (f"anomaly index above {estimation['threshold']:g} with size ratio at most "
                f"{estimation['max_size_ratio']:g}" if "threshold" in estimation and "max_size_ratio" in estimation
                else "a flagging anomaly index and size ratio")
        candidates = [(float(value), name, label) for name, values in index.items()
                      for label, value in enumerate(values or [])]
        closest = ""
        if candidates:
            value, name, label = max(candidates)
            closest = f"; largest anomaly index {value:.2f}: {name}, class {label}"
            if ratio.get(name):
                closest += f", size ratio {float(ratio[name][label]):.2f}"
            ratios = [(float(value), name, label) for name, values in ratio.items() if name in index
                      for label, value in enumerate(values or [])]
            if ratios:
                value, name, label = min(ratios)
                closest += (f"; smallest size ratio {value:.2f}: {name}, class {label}, anomaly index "
                            f"{float(index[name][label]):.2f}")
        return (f"trigger estimation: no backdoor found (no class's trigger has {rule}{closest}), model left "
                f"unchanged, {seconds}")
    label = estimation["target_class"]
    flagged = ", ".join(f"{name} (anomaly index {index[name][label]:.2f}, size ratio {ratio[name][label]:.2f})"
                        for name in estimation.get("flagged_by", []) if name in index)
    return f"trigger estimation: backdoor found, target class {label}, flagged by {flagged}, {seconds}"


def chance_line(accuracy: float, total: int, num_classes: int, what: str) -> str:
    """``the model is right on 9 % of the 50 unseen images (chance 10 %)``-style text; ``accuracy`` a fraction."""
    return f"right on {100 * accuracy:.0f} % of the {total} {what} images (chance {100 / num_classes:.0f} %)"


def greyscale_line(images: Tensor) -> str | None:
    """A warning when most of the unseen ``images`` (N, C, H, W), C > 1, are greyscale (every pixel's channels
    equal: greyscale files repeated into the model's channels): a model trained on colour images may answer them
    otherwise, and the repair's check, which runs on them, did not see a 16-pt loss of target-class accuracy on a
    new user's colour test images. ``None`` otherwise (a colour folder holds a few colourless pictures: 1 % of
    CIFAR-10's test split)."""
    if images.shape[1] < 2 or len(images) == 0:
        return None
    grey = int(images.diff(dim=1).flatten(1).eq(0).all(1).sum())
    if 2 * grey <= len(images):
        return None
    return (f"{grey} of the {len(images)} unseen images are greyscale, repeated into the model's {images.shape[1]} "
            f"channels: a model trained on colour images may answer them otherwise, and the repair's check runs on "
            f"them (a new user's lost 16 pt of target-class accuracy unseen); use colour images if you have them, "
            f"and check target_acc")


def class_order_line(confusion: Tensor, classes: Sequence[str] | None = None) -> str | None:
    """A warning when, for two labels or more, the test images of the label are predicted as one *other* class
    more often than as their own, significantly so (one-sided sign test, p < :data:`CHANCE_P_VALUE`): the labels
    are then likely not in the model's class order (swapped class folders or names in ``--classes`` move two labels
    at least), and every accuracy computed with them is wrong, while the overall accuracy can stay far from chance
    (a new user's cat/dog swap: 56 % on 10 classes, the two classes at 20 and 22 %). ``confusion`` (K, K): counts,
    rows the labels, columns the predictions. ``None`` otherwise. On a handful of images a weak model's own
    confusion of two classes looks the same (measured on 10 unseen images a class of a 62 %-accurate model: cat
    and dog predicted as each other more than as themselves in the right order too), so the test is what decides.
    Labels moved to one same class point to the inputs rather than the order (a forgotten ``normalize``: a model fed
    other inputs than it was trained on answers most of them with a few classes), and the line asks about both.
    ``classes``: the labels' names, shown beside their indices."""
    def named(label: int) -> str:
        name = classes[label] if classes is not None and len(classes) == len(confusion) else str(label)
        return f"{label} ({name})" if name != str(label) else str(label)

    moved, others_of = [], []
    for label, row in enumerate(confusion.long()):
        own = int(row[label])
        others = row.clone()
        others[label] = 0
        other = int(others.argmax())
        count = int(others[other])
        if count > own and binomial_tail(count, count + own, 0.5) < CHANCE_P_VALUE:  # a sign test
            moved.append(f"label {named(label)} as {named(other)} ({count} images, {own} as {label})")
            others_of.append(other)
    if len(moved) < 2:
        return None
    question = "are the class folders or names (--classes) in the model's label order?"
    if len(set(others_of)) < len(others_of):  # several labels taken for one class: not a reordering alone
        question = ("several as one class: are the images preprocessed as the model's training images were "
                    "(normalize, image size), and the class folders or names (--classes) in its label order?")
    return (f"test images are predicted as another class more often than as their own: {', '.join(moved)}; "
            f"{question} Every accuracy here is computed with these labels")


class SharedImages:
    """Counts the unseen images that are also test images (identical 8-bit pixels), fed the test images batch by
    batch (e.g. as ``evaluate_batches``' ``inspect``): a defense fitted on test images makes the test figures after
    it partly measured on its own training data.

    Args:
        unseen: the unseen images (N, C, H, W), uint8 or float pixels in [0, 1] (rounded to 8 bits to compare).
    """

    def __init__(self, unseen: Tensor) -> None:
        self.unseen = set(self.digests(unseen))
        self.found: set[bytes] = set()
        self.test_images = 0

    @staticmethod
    def digests(images: Tensor) -> list[bytes]:
        """One 16-byte digest per image of (N, C, H, W) pixels, uint8 or float in [0, 1], of its 8-bit values."""
        if images.dtype != torch.uint8:
            images = images.detach().float().mul(255).round().clamp(0, 255).to(torch.uint8)
        flat = images.cpu().contiguous().flatten(1).numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]

    def __call__(self, test_images: Tensor) -> None:
        self.test_images += len(test_images)
        self.found.update(digest for digest in self.digests(test_images) if digest in self.unseen)

    def line(self) -> str | None:
        """The warning when any unseen image was among the test images, else ``None``."""
        if not self.found:
            return None
        return (f"{len(self.found)} of the {len(self.unseen)} distinct unseen images are also among the "
                f"{self.test_images} test images (identical pixels): the defense was fitted on test images, so the "
                f"test figures after it are partly measured on its own data; take the unseen images from outside "
                f"the test split")


@torch.no_grad()
def success_rates(model: nn.Module, triggers: Sequence[Trigger], target_class: int, batches: Iterable[EvalBatch],
                  bf16: bool = False, forward: Forward | None = None, versions: int = 1) -> list[list[float]]:
    """Per version of ``model`` that ``forward`` runs (``versions`` of them; default: ``model`` alone) and per trigger
    of ``triggers``, in one read of ``batches`` (:class:`TestData`'s; the clean images and labels are read, each
    batch once whatever the number of triggers and versions): the fraction of the images not of ``target_class`` that the version assigns
    to ``target_class`` once the trigger is applied (attached to ``model`` for a feature-space trigger); 0 when
    every image is of ``target_class``. ``bf16``: the forward passes under bfloat16 autocast with channels-last
    inputs, as :func:`~lightning_backdoor.evaluation.evaluate_batches`'."""
    forward = forward or (lambda images: [model(images)])
    metrics = [[AttackSuccessRate(sync_on_compute=False) for _ in triggers] for _ in range(versions)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for images, labels, *_ in batches:
            attacked = labels.cpu() != target_class  # only these count: the target class's images are not run
            if not attacked.any():
                continue
            chosen = images[attacked.to(images.device)]
            pixels = (chosen.float() / 255 if chosen.dtype == torch.uint8 else chosen.float()).to(device)
            for index, trigger in enumerate(triggers):
                with trigger.attached(model):
                    triggered = trigger(pixels)
                    if bf16 and triggered.dim() == 4:
                        triggered = triggered.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                        outputs = [logits.float().cpu() for logits in forward(triggered)]
                for version, logits in zip(metrics, outputs, strict=True):
                    version[index].update(logits, torch.full((len(logits),), target_class))
    finally:
        model.train(was_training)
    return [[metric.compute().item() for metric in version] for version in metrics]


def trigger_success_rate(model: nn.Module, trigger: Trigger, target_class: int, batches: Iterable[EvalBatch],
                         bf16: bool = False) -> float:
    """The attack success rate of ``trigger`` on the images of ``batches`` not of ``target_class``
    (:func:`success_rates` of one trigger)."""
    return success_rates(model, [trigger], target_class, batches, bf16)[0][0]


def augmented_asr(model: nn.Module, mirrored: Trigger | None, moves: Sequence[Trigger], target_class: int,
                  batches: Iterable[EvalBatch], bf16: bool = False) -> dict[str, float]:
    """``mirrored_asr`` (the mirror image's ASR, when given) and ``moved_asr`` (the largest ASR over ``moves``, when
    any) on re-iterable ``batches`` (:class:`TestData`'s, or :func:`~lightning_backdoor.evaluation.in_batches` of
    images (N, C, H, W), uint8 or in [0, 1], and labels), by :func:`success_rates`: one read of the batches, one
    forward pass per trigger (:func:`~lightning_backdoor.triggers.augmentation_images` makes them); ``bf16`` as for
    :func:`success_rates`."""
    return augmented_asrs(model, mirrored, moves, target_class, batches, bf16)[0]


def augmented_asrs(model: nn.Module, mirrored: Trigger | None, moves: Sequence[Trigger], target_class: int,
                   batches: Iterable[EvalBatch], bf16: bool = False, forward: Forward | None = None,
                   versions: int = 1) -> list[dict[str, float]]:
    """:func:`augmented_asr` of each of the ``versions`` of ``model`` that ``forward`` runs, in one read of
    ``batches`` (:func:`success_rates`)."""
    triggers = ([mirrored] if mirrored is not None else []) + list(moves)
    if not triggers:
        return [{} for _ in range(versions)]
    results = []
    for rates in success_rates(model, triggers, target_class, batches, bf16, forward, versions):
        values = {"mirrored_asr": rates.pop(0)} if mirrored is not None else {}
        if moves:
            values["moved_asr"] = max(rates)
        results.append(values)
    return results


@dataclass
class DefenseReport:
    """A defense run between two evaluations on the test split (no I/O): metrics as fractions in [0, 1].

    Attributes:
        stages: metrics by stage, ``before``, ``after_edit`` (before a repair step; the final weights when there
            was none) and ``after``: CA, ASR, ASR floor, RA, TA (what the test data allows), per-class accuracy,
            and ``estimated_asr`` when only the estimated trigger could be measured.
        result: what the defense returned.
        num_unseen: unseen images the defense got.
        der: the defense effectiveness rating (when the true ASR was measured).
        estimated_target: the target the defense estimated, when its trigger's ASR was measured instead.
        warnings: one line per doubt about the result.
        environment: versions, threads and device the figures were made with.
        weights: which weights were defended: ``source`` (the file they were read from, or None), ``sha256_before``
            and ``sha256_after`` of the model's state (``lightning_backdoor.io.state_digest``); empty until the
            writer sets them.
        files: what the writer wrote, by key (``checkpoint``, ``safetensors``, ``plot``, ``estimated_trigger``,
            ``report``); empty until then.
    """

    stages: dict[str, dict[str, Any]]
    result: DefenseResult
    num_unseen: int
    der: float | None = None
    estimated_target: int | None = None
    warnings: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def before(self) -> dict[str, Any]:
        return self.stages["before"]

    @property
    def after(self) -> dict[str, Any]:
        return self.stages["after"]

    @property
    def true_asr_measured(self) -> bool:
        """Whether the test data carried the true trigger (else there is no ASR, RA or DER)."""
        return "asr" in self.stages["before"]

    def to_json(self) -> dict[str, Any]:
        """The ``defense_report.json`` layout: the stages, ``defense`` (method, layer, num_unseen, seconds,
        repaired and the result's details), ``true_asr_measured``, ``der`` / ``estimated_target`` when measured,
        ``warnings``, ``environment``, ``weights`` (when set), and the written files' paths."""
        result = self.result
        defense = {"method": result.method, "layer": result.layer, "num_unseen": self.num_unseen,
                   "seconds": result.seconds, "repaired": result.repaired} | result.details
        if "estimated_trigger" in self.files:
            defense["estimated_trigger"] = str(self.files["estimated_trigger"])
        report: dict[str, Any] = dict(self.stages) | {"defense": defense, "true_asr_measured": self.true_asr_measured}
        if self.der is not None:
            report["der"] = self.der
        if self.estimated_target is not None:
            report["estimated_target"] = self.estimated_target
        report |= {"warnings": list(self.warnings), "environment": self.environment}
        if self.weights:
            report["weights"] = self.weights
        return report | {key: str(path) for key, path in self.files.items()
                         if key not in ("estimated_trigger", "report")}

    def summary_line(self) -> str:
        """``ASR a -> b (floor f), CA c -> d, TA e -> g`` (fractions; f: the defended model's ASR floor, what b is to
        be read against; the mirrored and the moved trigger's ASR after the floor where measured; TA where the target
        class is known); without a test trigger, the estimated trigger's ASR and a note that the true ASR was not
        measured."""
        before, after = self.before, self.after
        clean = f"CA {before['clean_acc']:.4f} -> {after['clean_acc']:.4f}"
        if "target_acc" in before and "target_acc" in after:
            clean += f", TA {before['target_acc']:.4f} -> {after['target_acc']:.4f}"
        if self.true_asr_measured:
            floor = f" (floor {after['asr_floor']:.4f})" if "asr_floor" in after else ""
            mirrored = (f", mirrored ASR {before['mirrored_asr']:.4f} -> {after['mirrored_asr']:.4f}"
                        if "mirrored_asr" in before and "mirrored_asr" in after else "")
            moved = (f", moved ASR {before['moved_asr']:.4f} -> {after['moved_asr']:.4f}"
                     if "moved_asr" in before and "moved_asr" in after else "")
            return f"ASR {before['asr']:.4f} -> {after['asr']:.4f}{floor}{mirrored}{moved}, {clean}"
        if "estimated_asr" in before:
            return (f"true ASR not measured (no trigger for the test images); estimated trigger toward class "
                    f"{self.estimated_target}: ASR {before['estimated_asr']:.4f} -> {after['estimated_asr']:.4f}, "
                    f"{clean}")
        return f"true ASR not measured (no trigger for the test images; none estimated), {clean}"


def _augmentations_to_measure(test: TestData, unseen: Tensor) -> tuple[Trigger | None, list[Trigger], int]:
    """The test trigger's mirror image and the moves of both by :func:`~lightning_backdoor.triggers.crop_distance`
    pixels (:func:`~lightning_backdoor.triggers.augmentation_images`, decided on two of the ``unseen`` images, so the
    test loader is not read for it) and that distance, when the test trigger is known toward one target; else
    ``(None, [], 0)``. They are measured only where the batches carry the triggered half (the true ASR is
    measured)."""
    if test.trigger is None or test.target_class is None:
        return None, [], 0
    distance = crop_distance(unseen)
    return *augmentation_images(test.trigger, unseen, distance), distance


def run_defense(model: nn.Module, defense: Defense, unseen: UnseenData, knowledge: BackdoorKnowledge | None,
                test: TestData, after_defense: Callable[[], None] | None = None) -> DefenseReport:
    """Evaluate ``model`` on ``test``, defend it in place with ``knowledge`` (``None``: the defense must estimate or
    need none), evaluate again (and at each of the result's ``stages``); no I/O.

    Without a test trigger (no triggered half in ``test.batches``) the true ASR cannot be measured: each stage then
    holds ``estimated_asr``, the success of the trigger the defense *estimated* toward its estimated target, when it
    estimated one. With the test trigger known (``test.trigger``), each stage also holds ``mirrored_asr``, its
    mirror image's ASR (a model trained with random flips learns it too) and, for a local trigger, ``moved_asr``:
    the largest ASR of it and its mirror image moved by a random crop's few pixels (learnt the same way; one test
    pass per move, up to 16). ``after_defense`` runs right after the
    defense, before the evaluation after it (e.g. rounding the weights to the dtype the model stores them in).

    The stages are evaluated after the defense, in one read of the test split (:class:`~lightning_backdoor.defenses.
    stages.StageVersions`): where the defense changed one layer, the graph upstream of it runs once per batch for all
    stages.
    """
    mirror, moves, distance = _augmentations_to_measure(test, unseen.images)
    original = {name: value.detach().clone() for name, value in model.state_dict().items()}
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", JitterWarning)
            result = defense.defend(model, unseen, knowledge)
    finally:  # shown as they would have been, also when the defense raises; the jitter's also go into the report
        for caught_warning in caught:
            warnings.warn_explicit(caught_warning.message, caught_warning.category, caught_warning.filename,
                                   caught_warning.lineno, source=caught_warning.source)
    jitters = [str(caught_warning.message) for caught_warning in caught if caught_warning.category is JitterWarning]
    if after_defense is not None:
        after_defense()
    final = model.state_dict()
    states = {"before": original, **({"after_edit": final | result.stages["after_edit"]}
                                     if "after_edit" in result.stages else {}), "after": final}
    forward = StageVersions(model, list(states.values()), result.layer)  # ends in the final state
    shared = SharedImages(unseen.images)
    stages = dict(zip(states, evaluate_versions(model, forward, test.batches, test.num_classes, test.target_class,
                                                confusion=True, inspect=shared)))
    if "asr" in stages["before"] and test.target_class is not None:
        for values, augmented in zip(stages.values(), augmented_asrs(
                model, mirror, moves, test.target_class, test.batches, forward=forward, versions=len(states))):
            values |= augmented
    order = class_order_line(torch.tensor(stages["before"]["confusion"]), test.classes)
    for values in stages.values():
        values.pop("confusion")
    before, after = stages["before"], stages["after"]
    report = DefenseReport({"before": before, "after_edit": stages.get("after_edit", after), "after": after}, result,
                           len(unseen.labels))
    for line in (shared.line(), order):
        if line is not None:
            report.warnings.append(line)
    if report.true_asr_measured:
        report.der = defense_effectiveness_rating(before["asr"], after["asr"], before["clean_acc"], after["clean_acc"])
        for warning in (trigger_inactive(before, result.method),
                        backdoor_left(before, after, result.details, result.method),
                        mirror_left(after, result.details, result.method),
                        moved_left(after, distance, result.details, result.method)):
            if warning is not None:
                report.warnings.append(warning)
    elif result.method.endswith("/no_backdoor_found"):
        report.warnings.append("the trigger estimation found no backdoor and left the model unchanged; with no "
                               "trigger to test the images with, this is no evidence that the model is clean (it has "
                               "missed BadNets on PreAct-ResNet18: docs/results/preact-resnet18.md)")
    elif result.estimated is not None:  # no test trigger: the estimated one's ASR, in whole passes of each stage
        # (a feature-space trigger is a hook attached while the passes run, after the shortcut's graph was traced)
        report.estimated_target = result.estimated.target_class
        rates = success_rates(model, [result.estimated.trigger], result.estimated.target_class, test.batches,
                              forward=StageVersions(model, list(states.values()), None), versions=len(states))
        for stage, (rate,) in zip(states, rates):
            report.stages[stage]["estimated_asr"] = rate
    repair = repair_warning(result.details)
    if repair is not None:
        report.warnings.append(repair)
    if jitters:
        report.warnings.append(f"{len(jitters)} of the edit's linear solves (layer candidates, folds, the final "
                               f"edit) needed a jitter on the diagonal, the last: {jitters[-1]}")
    total = test.num_images
    if near_chance(round(after["clean_acc"] * total), total, test.num_classes):
        accuracy = chance_line(after["clean_acc"], total, test.num_classes, "test")
        report.warnings.append(f"after the defense the model is {accuracy}: near chance")
    # bit-identical figures need the same stack, thread count and device
    report.environment = environment() | {"device": str(next(model.parameters()).device)}
    return report
