"""Estimating a backdoor without knowledge of it (METHOD.md §3, ¬BDK): invert a trigger toward every class and flag
the class whose trigger is anomalously small by the median-absolute-deviation anomaly index. Defending with the
estimate is :class:`~lightning_backdoor.defenses.estimate_first.EstimateFirst`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_backdoor.defenses.activations import editable_layers, get_layer
from lightning_backdoor.defenses.base import UnseenData
from lightning_backdoor.defenses.inversion import INVERSIONS, EstimatedTrigger, invert

#: Makes the median absolute deviation a consistent estimator of the standard deviation for normal data.
CONSISTENCY_CONSTANT = 1.4826


def anomaly_index(sizes: Tensor) -> Tensor:
    """Neural Cleanse's anomaly index per class: (median − size) / (1.4826 · MAD), positive on the small side.

    ``sizes`` (K,); the median is the midpoint of the two middle values for even K (as numpy's). A class is an
    outlier when its index exceeds 2. Where MAD is 0, a size below the median gets +inf.
    """
    sizes = sizes.double()
    median = sizes.quantile(0.5)
    mad = CONSISTENCY_CONSTANT * (sizes - median).abs().quantile(0.5)
    deviation = median - sizes
    if mad == 0:
        return torch.where(deviation == 0, torch.zeros_like(sizes), deviation.sign() * float("inf"))
    return deviation / mad


def size_anomaly_index(sizes: Tensor, log_scale: bool = True) -> Tensor:
    """The anomaly index of the *log* trigger sizes (of the sizes themselves, as Neural Cleanse's, without
    ``log_scale``): sizes are scales, spread far wider above the median than below (a class can need 13 times the
    median's trigger), and on a linear scale that wide upper side inflates the MAD until a backdoor at a tenth of
    the median size no longer stands out."""
    return anomaly_index(sizes.double().clamp(min=1e-12).log() if log_scale else sizes)


def flaggable_index(sizes: Tensor, max_size_ratio: float, log_scale: bool = True) -> Tensor:
    """:func:`size_anomaly_index` of classes whose trigger is at most ``max_size_ratio`` of the median size, -inf
    elsewhere: with a tight spread of sizes, a class a little smaller than the rest is an outlier by MAD but no
    backdoor."""
    index = size_anomaly_index(sizes, log_scale)
    return torch.where(size_ratio(sizes) <= max_size_ratio, index, torch.full_like(index, -math.inf))


def size_ratio(sizes: Tensor) -> Tensor:
    """Each class's trigger size over the median class's (the midpoint of the two middle ones for even K)."""
    return sizes.double() / sizes.double().quantile(0.5).clamp(min=1e-12)


@dataclass
class BackdoorEstimate:
    """The estimation's outcome: the flagged target and its trigger (None when no class is anomalous), the candidate
    for that class of every estimator that flags it (name -> trigger, the largest index first), and the strengths at
    which the edit uses each candidate; ``picture`` (C, H, W) in [0, 1] shows the trigger: the first flagging
    image-space candidate's, else (flagged in feature space only) the first image-space estimator's for the class;
    ``every_candidate`` holds every estimator's candidate for the class, flagging ones first (for inspection);
    ``shift``: how far the edit also moves each patch candidate."""

    target_class: int | None
    trigger: EstimatedTrigger | None
    estimator: str | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    candidates: dict[str, EstimatedTrigger] = field(default_factory=dict)
    strengths: tuple[float, ...] = (1.0,)
    picture: Tensor | None = None
    every_candidate: dict[str, EstimatedTrigger] = field(default_factory=dict)
    shift: int = 0

    def edit_triggers(self) -> list[EstimatedTrigger]:
        """Every candidate at every strength, and each patch candidate also moved ``shift`` pixels up, down, left and
        right: the triggers the edit maps to clean values."""
        triggers = []
        for name, trigger in self.candidates.items():
            for strength in self.strengths:
                stronger = trigger.strengthened(strength)
                triggers += [stronger, *(stronger.moved(*move) for move in self._moves(name))]
        return triggers

    def _moves(self, name: str) -> list[tuple[int, int]]:
        if not (self.shift and INVERSIONS[name].local):
            return []
        return [(0, self.shift), (0, -self.shift), (self.shift, 0), (-self.shift, 0)]

    def report(self) -> dict[str, Any]:
        """JSON-able summary for the defense report."""
        moved = f" (and moved {self.shift} px each way)"
        edited_with = [f"{name} x{strength:g}" + (moved if self._moves(name) else "")
                       for name in self.candidates for strength in self.strengths]
        return {"backdoor_found": self.target_class is not None, "target_class": self.target_class,
                "estimator": self.estimator, "edited_with": edited_with, "seconds": self.seconds} | self.details


class TriggerEstimator:
    """Estimate the target class and trigger of a backdoored classifier from unseen clean images.

    Runs each inversion in ``estimators`` over U (all classes batched), computes each one's anomaly index over the
    classes' log trigger sizes, and flags the class with the largest index above ``threshold`` (small side) in any of
    them whose trigger is also at most ``max_size_ratio`` of that estimator's median size (a backdoor's trigger is
    a fraction of a natural class's, not just a tail value of a tight spread); the edit uses the candidate for the
    flagged class of every estimator that flags it, each at every one of ``strengths`` (the other estimators'
    candidates are a natural class's features: editing them away costs clean accuracy).

    Args:
        estimators: inversions to run: ``neural_cleanse`` (mask + pattern, for patch triggers), ``blend`` (one
            opacity over the whole image + pattern, for blended triggers), ``perturbation`` (universal additive
            perturbation, for global triggers), ``warp`` (smooth displacement field, for warping triggers) and/or
            ``feature`` (channel mask + pattern at the input of the convolution before the edited layer).
        threshold: the anomaly index above which a class is flagged (Neural Cleanse's 2).
        max_size_ratio: the largest trigger size, relative to the median class's, that can be flagged.
        log_scale: score the log sizes (default) or, as Neural Cleanse does, the sizes themselves.
        strengths: the factors by which the edit scales each candidate's mask or perturbation (each ≥ 1): an
            inversion finds the weakest trigger that works, an attacker's is stronger.
        shift: the edit also maps each patch candidate (Neural Cleanse's) moved this many pixels up, down, left and
            right (wrapping around; 0: off): a convolutional network detects a patch wherever it sits, and the
            inversion finds it at one place that works, not necessarily the attacker's.
        max_steps: optimisation steps per inversion (each step: one batch for every class).
        batch_size: unseen images per class candidate per step.
        patience: early stopping, steps without a 1 % improvement of any class's best size.
        min_per_class: fewest unseen images of every class the estimation accepts.
        progress: show a progress bar.
        seed: fixes the initial candidates and the batches.
    """

    def __init__(self, estimators: tuple[str, ...] = ("neural_cleanse", "blend", "perturbation", "warp", "feature"),
                 threshold: float = 2.0, max_size_ratio: float = 0.3, log_scale: bool = True,
                 strengths: tuple[float, ...] = (1.0, 1.5), shift: int = 8, max_steps: int = 100, batch_size: int = 8,
                 patience: int = 25, min_per_class: int = 5, progress: bool = True, seed: int = 0) -> None:
        unknown = [name for name in estimators if name not in INVERSIONS]
        if unknown or not estimators:
            raise ValueError(f"unknown trigger estimator(s) {unknown}; known: {', '.join(INVERSIONS)}")
        if not 0 < max_size_ratio <= 1:
            raise ValueError(f"max_size_ratio={max_size_ratio} must be in (0, 1]: a flagged trigger is at most the "
                             f"median class's size")
        if not strengths or min(strengths) < 1:
            raise ValueError(f"strengths={tuple(strengths)} must be one or more factors >= 1 (1: the candidate as "
                             f"estimated; a weaker trigger than the weakest that works teaches the edit nothing)")
        self.estimators, self.threshold, self.max_size_ratio = tuple(estimators), threshold, max_size_ratio
        self.log_scale = log_scale
        if shift < 0:
            raise ValueError(f"shift={shift} must be >= 0 pixels (0: patch candidates are not moved)")
        self.strengths = tuple(float(strength) for strength in strengths)
        self.shift = shift
        self.max_steps, self.batch_size = max_steps, batch_size
        self.patience, self.min_per_class, self.progress, self.seed = patience, min_per_class, progress, seed

    def check(self, num_classes: int, labels: Tensor) -> None:
        """One-line ``ValueError`` when the model or the unseen split cannot support an estimate."""
        if num_classes < 3:
            raise ValueError(f"trigger estimation needs a model with at least 3 output classes (the anomaly index "
                             f"compares each class with the others); this model has {num_classes}")
        counts = torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes]
        if counts.min() < self.min_per_class:
            raise ValueError(f"trigger estimation needs at least {self.min_per_class} unseen images of every class; "
                             f"class {int(counts.argmin())} has {int(counts.min())} (use unseen_per_class >= "
                             f"{self.min_per_class})")

    def estimate(self, model: nn.Module, unseen: UnseenData, layer: str = "auto") -> BackdoorEstimate:
        """Invert, score and flag; ``model`` is left unchanged (eval mode during the estimate). ``layer`` is where
        the edit will act (``auto``: the last editable convolution); the feature inversion acts one convolution
        before it (:func:`feature_layer`)."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        images, labels = unseen.images.float(), unseen.labels
        with torch.no_grad():
            num_classes = model(images[:1]).shape[-1]
        self.check(num_classes, labels)
        layer = feature_layer(model, layer)
        generator = torch.Generator().manual_seed(self.seed)
        details: dict[str, Any] = {"feature_layer": layer, "anomaly_index": {}, "trigger_size": {}, "size_ratio": {},
                                   "inversion_success": {}, "steps": {}, "estimator_seconds": {}}
        inversions, eligible = {}, {}
        try:
            for name in self.estimators:
                began = time.perf_counter()
                inversion = INVERSIONS[name].create(model, images, num_classes, generator, layer).to(images.device)
                result = invert(model, images, labels, inversion, max_steps=self.max_steps,
                                batch_size=self.batch_size, patience=self.patience, generator=generator,
                                progress=self.progress)
                index = size_anomaly_index(result.sizes, self.log_scale)
                details["anomaly_index"][name] = [round(value, 3) for value in index.tolist()]
                details["trigger_size"][name] = [round(value, 4) for value in result.sizes.tolist()]
                details["size_ratio"][name] = [round(value, 3) for value in size_ratio(result.sizes).tolist()]
                details["inversion_success"][name] = [round(value, 3) for value in result.success.tolist()]
                details["steps"][name] = result.steps
                details["estimator_seconds"][name] = round(time.perf_counter() - began, 3)
                inversions[name] = result.inversion
                eligible[name] = flaggable_index(result.sizes, self.max_size_ratio, self.log_scale)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        name = max(eligible, key=lambda estimator: eligible[estimator].max().item())
        label = int(eligible[name].argmax())
        if eligible[name][label] <= self.threshold:
            return BackdoorEstimate(None, None, None, seconds, details | {"flagged_by": []})
        flagging = sorted((other for other in eligible if eligible[other][label] > self.threshold),
                          key=lambda other: -eligible[other][label].item())
        every = {other: inversions[other].trigger(label) for other in (*flagging, *inversions)}
        triggers = {other: every[other] for other in flagging}
        picture = next((trigger.picture() for trigger in every.values() if hasattr(trigger, "picture")), None)
        return BackdoorEstimate(label, triggers[name], name, seconds, details | {"flagged_by": flagging}, triggers,
                                self.strengths, picture, every, self.shift)


def feature_layer(model: nn.Module, edited: str = "auto") -> str:
    """The layer at whose input the feature inversion acts: the editable convolution before the ``edited`` one
    (``auto``: before the last editable convolution), or the edited layer itself where no convolution precedes it.
    A block below the edit, a warping trigger's features still have a spatial layout and stand apart from the
    natural classes' (docs/results/cifar10.md, trigger unknown)."""
    layers = editable_layers(model)
    convolutions = [name for name in layers if isinstance(get_layer(model, name), nn.Conv2d)]
    edited = (convolutions or layers)[-1] if edited == "auto" else edited
    get_layer(model, edited)  # a wrong name fails with the list of valid ones
    earlier = [name for name in convolutions if layers.index(name) < layers.index(edited)]
    return earlier[-1] if earlier else edited
