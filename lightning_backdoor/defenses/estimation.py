"""Estimating a backdoor without knowledge of it (METHOD.md §3, ¬BDK): invert a trigger toward every class and flag
the class whose trigger is anomalously small by the median-absolute-deviation anomaly index. Defending with the
estimate is :class:`~lightning_backdoor.defenses.estimate_first.EstimateFirst`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_backdoor.defenses.activations import editable_layers, get_layer, key_positions
from lightning_backdoor.defenses.base import UnseenData, check_seed
from lightning_backdoor.defenses.inversion import (INVERSIONS, EarlyStop, EstimatedTrigger, Inversion, InversionResult,
                                                  InversionRun, NotApplicable)
from lightning_backdoor.defenses.residual import bypassed
from lightning_backdoor.precision import use_bf16

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

    def edit_triggers(self, success: Callable[[EstimatedTrigger], float] | None = None,
                      keep: float = 0.5) -> list[EstimatedTrigger]:
        """Every candidate at every strength, and each patch candidate also moved ``shift`` pixels up, down, left and
        right: the triggers the edit maps to clean values. With ``success`` (the fraction of the unseen non-target
        images a trigger sends to the target class), a moved candidate is kept only where it sends at least
        ``keep`` times as many as the candidate at its own place: a placement the model does not react to asks
        the edit to keep that pattern's outputs as they are, and dilutes the edit of the placements that do act
        (docs/results/vit.md, "A ViT with LayerScale")."""
        triggers = []
        for name, trigger in self.candidates.items():
            for strength in self.strengths:
                stronger = trigger.strengthened(strength)
                moved = [stronger.moved(*move) for move in self._moves(name)]
                if success is not None and moved:
                    least = keep * success(stronger)
                    moved = [placement for placement in moved if success(placement) >= least]
                triggers += [stronger, *moved]
        return triggers

    def _moves(self, name: str) -> list[tuple[int, int]]:
        if not (self.shift and INVERSIONS[name].local):
            return []
        return [(0, self.shift), (0, -self.shift), (self.shift, 0), (-self.shift, 0)]

    def report(self) -> dict[str, Any]:
        """JSON-able summary for the defense report."""
        moved = f" (and moved {self.shift} px each way where that acts: see placements)"
        edited_with = [f"{name} x{strength:g}" + (moved if self._moves(name) else "")
                       for name in self.candidates for strength in self.strengths]
        return {"backdoor_found": self.target_class is not None, "target_class": self.target_class,
                "estimator": self.estimator, "edited_with": edited_with, "seconds": self.seconds} | self.details


@dataclass
class Screening:
    """One inversion's outcome over the K classes, as the anomaly statistics see it.

    ``sizes`` (K,): the trigger size each class enters the statistics with: the full inversion's for the fully
    inverted classes, for a screened-out class its pre-screen size times ``exp(shrink)``. ``prescreen_sizes`` (K,)
    the sizes after the pre-screen (None without one); ``candidates``: the suspects fully inverted (every class
    without a pre-screen), ``references``: the middle classes also fully inverted to measure ``shrink``, the median
    log change of their size from the pre-screen to the full inversion; ``screened_out``: the rest."""

    sizes: Tensor
    result: InversionResult
    candidates: tuple[int, ...]
    references: tuple[int, ...] = ()
    screened_out: tuple[int, ...] = ()
    prescreen_sizes: Tensor | None = None
    shrink: float = 0.0

    @property
    def fully_inverted(self) -> tuple[int, ...]:
        """The classes whose candidate ran the full inversion (sorted)."""
        return tuple(sorted((*self.candidates, *self.references)))

    def flaggable(self, max_size_ratio: float, log_scale: bool = True) -> Tensor:
        """:func:`flaggable_index` (K,) of the fully inverted classes, -inf for the screened-out ones (a class
        without a finished trigger cannot be flagged)."""
        index = torch.full((len(self.sizes),), -math.inf, dtype=torch.float64)
        inverted = list(self.fully_inverted)
        index[inverted] = flaggable_index(self.sizes, max_size_ratio, log_scale)[inverted]
        return index


class TriggerEstimator:
    """Estimate the target class and trigger of a backdoored classifier from unseen clean images.

    Runs each inversion in ``estimators`` over U (all classes batched), computes each one's anomaly index over the
    classes' log trigger sizes, and flags the class with the largest index above ``threshold`` (small side) in any of
    them whose trigger is also at most ``max_size_ratio`` of that estimator's median size (a backdoor's trigger is
    a fraction of a natural class's, not just a tail value of a tight spread); the edit uses the candidate for the
    flagged class of every estimator that flags it, each at every one of ``strengths`` (the other estimators'
    candidates are a natural class's features: editing them away costs clean accuracy).

    **Pre-screen** (``prescreen_steps``; target screening as in K-Arm, Shen et al. ICML 2021, which spends the
    optimisation on the labels that look most promising instead of on every label): every class's candidate is
    optimised ``prescreen_steps`` steps in one batch; then only the ``candidates`` classes with the smallest sizes
    (classes that already reached the success rate first), up to as many more within ``candidate_margin`` of the
    last of them, and ``references`` classes from the middle of that order continue, from where they were, to
    ``max_steps``. The cost is ``prescreen_steps`` steps of all K classes plus the full steps of a constant number
    of classes, where the exhaustive inversion costs ``max_steps`` steps of all K.

    Why the anomaly statistics stay sound: the index and the size ratio compare a class's size with the median and
    MAD of *all* classes' sizes after the *same* optimisation. A screened-out class stopped early, so its size is
    an upper bound of what the full inversion would reach; fed in as it is, it would raise the median and the MAD's
    centre, make every candidate look smaller than it is and flag clean models. So the statistics take each
    screened-out class at its pre-screen size moved by the shrink that the full inversion measured on the reference
    classes (the median log change of their sizes): the median class's level comes from classes that ran the full
    optimisation, the spread and order of the other classes from the pre-screen, which ran them all alike. Only
    fully inverted classes can be flagged (a screened-out class has no finished trigger); the report lists the
    screened-out classes per estimator (``screened_out``) with the pre-screen sizes and the shrink.
    ``docs/results/estimation-scaling.md`` measures this against the exhaustive inversion.

    **Confirmation** (``confirm_ratio``): the shrink is an estimate, so a pre-screened size ratio can sit a few
    hundredths from the exhaustive one (0.28 against 0.33 on a clean model: a false alarm at the 0.3 limit). A class
    a pre-screened inversion would flag with a size ratio above ``confirm_ratio`` (a close call) is confirmed by
    running that inversion again exhaustively, whose statistics then decide for it; the report's ``confirmed``
    lists, per estimator, the class, its pre-screened ratio and the exhaustive one. A backdoor's trigger is usually
    far below the limit (size ratios 0.00-0.17 on the CIFAR-10 models), so the confirmation rarely runs.

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
        max_steps: optimisation steps per inversion (each step: one batch for every live class).
        batch_size: unseen images per class candidate per step.
        patience: early stopping, steps without a 1 % improvement of a class's best size (``early_stop``).
        early_stop: ``all``: the whole inversion stops when every class's best size has converged (the original
            rule); ``class``: each class leaves the batch once its own has.
        prescreen_steps: steps of the pre-screen of every class (e.g. 20, on models of at least
            ``prescreen_min_classes`` classes), or None (the default): every class runs the full inversion (the
            exhaustive estimate; so does a value >= ``max_steps``). Opt-in and not recommended: forced onto the six
            10-class models of the README, the pre-screen with its close-call confirmation gives the exhaustive
            verdicts, but on a real 40-class backdoored model it screened out the true target in four of five
            inversions, at 20 and at 50 steps, and in all five with each inversion on its own random stream
            (docs/results/estimation-scaling.md).
        prescreen_min_classes: the fewest classes a model must have for the pre-screen to run (below, exhaustive,
            as before the pre-screen existed: with 10 classes it saves at most 40 % of the steps, and the figures
            measured exhaustively on the 10-class models stay as they are; the pre-screen also never runs where K
            <= ``candidates + references``, nothing would be screened out).
        candidates: the fewest suspects that continue after the pre-screen.
        candidate_margin: a class whose pre-screen size is at most ``1 + candidate_margin`` times the last
            suspect's also continues (a close call is not screened out; at most ``candidates`` more).
        references: middle classes that also continue, to measure the shrink the statistics apply to the
            screened-out classes (0: they enter with their pre-screen sizes, which is not sound, for comparison).
        confirm_ratio: a pre-screened flag with a size ratio above this is confirmed by that inversion run
            exhaustively (0: every pre-screened flag; ``max_size_ratio`` or more: none).
        bf16: run the inversions' forward passes under bfloat16 autocast (about 2x faster on a CPU that computes
            bfloat16 natively, several times slower on one that emulates it); ``None``: where the images' device
            computes it natively (:func:`~lightning_backdoor.precision.native_bf16`).
        min_per_class: fewest unseen images of every class the estimation accepts.
        progress: show a progress bar (on a terminal; never into a redirected log).
        seed: an integer in [0, 2**63); fixes the initial candidates and the batches. Each inversion draws from
            its own stream, seeded by ``seed`` and its place in the registry (Neural Cleanse, the first, by ``seed``
            itself): its result does not depend on which other estimators ran before it, and no two inversions draw
            the same start or batches.

    Raises:
        ValueError: (one line) unknown estimators or a setting out of range.
    """

    def __init__(self, estimators: tuple[str, ...] = ("neural_cleanse", "blend", "perturbation", "warp", "feature"),
                 threshold: float = 2.0, max_size_ratio: float = 0.3, log_scale: bool = True,
                 strengths: tuple[float, ...] = (1.0, 1.5), shift: int = 8, max_steps: int = 100, batch_size: int = 8,
                 patience: int = 25, early_stop: EarlyStop = "all", prescreen_steps: int | None = None,
                 prescreen_min_classes: int = 16, candidates: int = 3, candidate_margin: float = 0.05,
                 references: int = 2, confirm_ratio: float = 0.15, bf16: bool | None = None,
                 min_per_class: int = 5, progress: bool = True, seed: int = 0) -> None:
        if isinstance(estimators, str) or not estimators:
            raise ValueError(f"estimators={estimators!r} must name one or more estimators as a list, e.g. "
                             f"['feature']; known: {', '.join(INVERSIONS)}")
        unknown = [name for name in estimators if name not in INVERSIONS]
        if unknown:
            raise ValueError(f"unknown trigger estimator(s) {unknown}; known: {', '.join(INVERSIONS)}")
        if not 0 < max_size_ratio <= 1:
            raise ValueError(f"max_size_ratio={max_size_ratio} must be in (0, 1]: a flagged trigger is at most the "
                             f"median class's size")
        if not strengths or min(strengths) < 1:
            raise ValueError(f"strengths={tuple(strengths)} must be one or more factors >= 1 (1: the candidate as "
                             f"estimated; a weaker trigger than the weakest that works teaches the edit nothing)")
        if shift < 0:
            raise ValueError(f"shift={shift} must be >= 0 pixels (0: patch candidates are not moved)")
        if early_stop not in ("class", "all"):
            raise ValueError(f"early_stop={early_stop!r} must be 'class' (each class stops on its own) or 'all'")
        if prescreen_steps is not None and prescreen_steps < 1:
            raise ValueError(f"prescreen_steps={prescreen_steps} must be >= 1 or None (no pre-screen: every class "
                             f"runs the full inversion)")
        if confirm_ratio < 0:
            raise ValueError(f"confirm_ratio={confirm_ratio} must be >= 0 (0: every pre-screened flag is confirmed)")
        check_seed(seed)
        if len(set(estimators)) < len(estimators):
            raise ValueError(f"estimators={tuple(estimators)} names an estimator twice; name each once")
        if candidates < 1 or references < 0 or candidate_margin < 0:
            raise ValueError(f"candidates={candidates} must be >= 1, references={references} and "
                             f"candidate_margin={candidate_margin} >= 0")
        self.estimators, self.threshold, self.max_size_ratio = tuple(estimators), threshold, max_size_ratio
        self.log_scale = log_scale
        self.strengths = tuple(float(strength) for strength in strengths)
        self.shift = shift
        self.max_steps, self.batch_size = max_steps, batch_size
        self.patience, self.early_stop = patience, early_stop
        self.prescreen_steps, self.candidates, self.candidate_margin = prescreen_steps, candidates, candidate_margin
        self.prescreen_min_classes = prescreen_min_classes
        self.references, self.confirm_ratio, self.bf16 = references, confirm_ratio, bf16
        self.min_per_class, self.progress, self.seed = min_per_class, progress, seed

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

    def estimate(self, model: nn.Module, unseen: UnseenData, layer: str = "auto",
                 candidates: list[str] | None = None) -> BackdoorEstimate:
        """Invert, score and flag; ``model`` is left unchanged (eval mode during the estimate). ``layer`` is where
        the edit will act (``auto``: the last editable convolution), ``candidates`` the layers ``auto`` will choose
        from where known; the feature inversion acts one convolution before the edit, or before every candidate
        (:func:`feature_layer`). An estimator that cannot act on the model (the feature one where that
        convolution reads the image, as a ViT's patch embedding does) is skipped, its reason in
        ``details["not_applicable"]``.

        Raises:
            ValueError: (one line) too few classes or unseen images (:meth:`check`), or no estimator applies.
        """
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        images, labels = unseen.images.float(), unseen.labels
        with torch.no_grad():
            num_classes = model(images[:1]).shape[-1]
        self.check(num_classes, labels)
        layer = feature_layer(model, layer, candidates, images[:1])
        prescreened = self.prescreens(num_classes)
        details: dict[str, Any] = {"feature_layer": layer, "prescreen_steps": self.prescreen_steps if prescreened
                                   else None, "bf16": use_bf16(self.bf16, images.device),
                                   "threshold": self.threshold, "max_size_ratio": self.max_size_ratio,
                                   "anomaly_index": {}, "trigger_size": {}, "size_ratio": {},
                                   "inversion_success": {}, "steps": {}, "estimator_seconds": {},
                                   "fully_inverted": {}, "screened_out": {}, "prescreen_size": {},
                                   "prescreen_shrink": {}, "confirmed": {}, "not_applicable": {}}
        inversions, eligible = {}, {}
        try:
            for name in self.estimators:
                began = time.perf_counter()
                generator = inversion_generator(self.seed, name)  # independent of the estimators before it
                state = generator.get_state()
                try:
                    inversion = INVERSIONS[name].create(model, images, num_classes, generator, layer)
                except NotApplicable as reason:  # e.g. the feature estimator on a ViT: the others still run
                    details["not_applicable"][name] = str(reason)
                    continue
                inversion = inversion.to(images.device)
                screening = self.screen(model, images, labels, inversion, generator)
                close_call = self.close_call(screening)
                if close_call is not None:  # the same start and batches, run exhaustively
                    label, ratio = close_call
                    generator.set_state(state)
                    inversion = INVERSIONS[name].create(model, images, num_classes, generator, layer).to(images.device)
                    screening = self.screen(model, images, labels, inversion, generator, exhaustive=True)
                    details["confirmed"][name] = {"class": label, "prescreened_ratio": round(ratio, 3),
                                                  "exhaustive_ratio": round(float(size_ratio(screening.sizes)[label]),
                                                                            3)}
                sizes = screening.sizes
                index = size_anomaly_index(sizes, self.log_scale)
                details["anomaly_index"][name] = [round(value, 3) for value in index.tolist()]
                details["trigger_size"][name] = [round(value, 4) for value in sizes.tolist()]
                details["size_ratio"][name] = [round(value, 3) for value in size_ratio(sizes).tolist()]
                details["inversion_success"][name] = [None if math.isnan(value) else round(value, 3)
                                                      for value in screening.result.success.tolist()]
                details["steps"][name] = screening.result.steps
                details["fully_inverted"][name] = list(screening.fully_inverted)
                details["screened_out"][name] = list(screening.screened_out)
                if screening.prescreen_sizes is not None:
                    details["prescreen_size"][name] = [round(value, 4) for value in screening.prescreen_sizes.tolist()]
                    details["prescreen_shrink"][name] = round(screening.shrink, 4)
                details["estimator_seconds"][name] = round(time.perf_counter() - began, 3)
                inversions[name] = screening.result.inversion
                eligible[name] = screening.flaggable(self.max_size_ratio, self.log_scale)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        if not eligible:
            raise ValueError("no trigger estimator applies to this model: " + "; ".join(
                f"{name}: {reason}" for name, reason in details["not_applicable"].items()))
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

    def prescreens(self, num_classes: int) -> bool:
        """Whether a model with ``num_classes`` classes is pre-screened: ``prescreen_steps`` set and below
        ``max_steps``, at least ``prescreen_min_classes`` classes, and more than ``candidates + references``."""
        return (self.prescreen_steps is not None and self.prescreen_steps < self.max_steps
                and num_classes >= max(self.prescreen_min_classes, self.candidates + self.references + 1))

    def close_call(self, screening: Screening) -> tuple[int, float] | None:
        """The class a *pre-screened* inversion would flag with a size ratio above ``confirm_ratio``, with that
        ratio; ``None`` for an exhaustive inversion, no flag, or a flag well below the limit."""
        if screening.prescreen_sizes is None:
            return None
        index = screening.flaggable(self.max_size_ratio, self.log_scale)
        label = int(index.argmax())
        ratio = float(size_ratio(screening.sizes)[label])
        return (label, ratio) if index[label] > self.threshold and ratio > self.confirm_ratio else None

    def screen(self, model: nn.Module, images: Tensor, labels: Tensor, inversion: Inversion,
               generator: torch.Generator, exhaustive: bool = False) -> Screening:
        """Run one inversion, pre-screened or exhaustive (see the class; ``exhaustive`` forces the latter), and the
        sizes the statistics use. ``images`` float (N, C, H, W) in [0, 1], ``labels`` (N,); ``model`` in eval
        mode."""
        num_classes = len(inversion.sizes())
        run = InversionRun(inversion, patience=self.patience, early_stop=self.early_stop)
        bf16 = use_bf16(self.bf16, images.device)
        settings = {"batch_size": self.batch_size, "bf16": bf16, "generator": generator,
                    "progress": self.progress, "description": f"trigger estimation ({inversion.name})"}
        if exhaustive or not self.prescreens(num_classes):
            run.run(model, images, labels, self.max_steps, **settings)
            result = run.finish(model, images, labels, bf16)
            return Screening(result.sizes, result, tuple(range(num_classes)))
        run.run(model, images, labels, self.prescreen_steps, **settings | {"description": settings["description"]
                                                                            + " pre-screen"})
        prescreen_sizes = run.sizes().cpu()
        order = prescreen_order(prescreen_sizes, torch.isfinite(run.best).cpu())
        candidates = suspects(order, prescreen_sizes, self.candidates, self.candidate_margin)
        references = middle_classes(order, candidates, self.references)
        kept = torch.tensor(sorted((*candidates, *references)), dtype=torch.long)
        run.keep(kept.to(run.best.device))
        run.run(model, images, labels, self.max_steps - self.prescreen_steps, **settings)
        measured = torch.zeros(num_classes, dtype=torch.bool)
        measured[kept] = True
        result = run.finish(model, images, labels, bf16, measured.to(run.best.device))
        shrink = 0.0
        if references:
            changes = (result.sizes[list(references)].double().clamp(min=1e-12).log()
                       - prescreen_sizes[list(references)].double().clamp(min=1e-12).log())
            shrink = float(changes.median())  # the lower middle of an even count: the larger shrink (conservative)
        sizes = prescreen_sizes.double() * math.exp(shrink)
        sizes[kept] = result.sizes[kept].double()
        screened_out = tuple(int(label) for label in order if int(label) not in kept.tolist())
        return Screening(sizes.float(), result, candidates, references, screened_out, prescreen_sizes, shrink)


def inversion_generator(seed: int, name: str) -> torch.Generator:
    """The random stream of the inversion ``name`` (a name of ``INVERSIONS``), for ``seed`` in [0, 2**63): seeded by
    ``seed`` plus a large prime times the inversion's place in the registry (the first, Neural Cleanse, by ``seed``
    itself), so that each inversion has its own stream whatever ran before it."""
    return torch.Generator().manual_seed(seed + 1_000_003 * list(INVERSIONS).index(name))


def prescreen_order(sizes: Tensor, succeeded: Tensor) -> list[int]:
    """The classes by pre-screen suspicion, most suspicious first: those whose candidate already reached the success
    rate by size, then the others by size. ``sizes``, ``succeeded`` (K,)."""
    return sorted(range(len(sizes)), key=lambda label: (not bool(succeeded[label]), float(sizes[label]), label))


def suspects(order: list[int], sizes: Tensor, count: int, margin: float) -> tuple[int, ...]:
    """The first ``count`` classes of ``order`` (:func:`prescreen_order`) and up to ``count`` right after them whose
    size is at most ``1 + margin`` times the last of those's (``sizes`` (K,)): a close call is not screened out, and
    a tight spread of sizes does not make every class a suspect."""
    chosen = list(order[:count])
    bound = (1 + margin) * float(sizes[chosen[-1]])
    for label in order[count:2 * count]:
        if float(sizes[label]) > bound:
            break
        chosen.append(label)
    return tuple(chosen)


def middle_classes(order: list[int], taken: tuple[int, ...], count: int) -> tuple[int, ...]:
    """``count`` classes of ``order`` not in ``taken``, those nearest its middle position first."""
    middle = (len(order) - 1) / 2
    rest = [label for label in order if label not in taken]
    return tuple(sorted(rest, key=lambda label: (abs(order.index(label) - middle), order.index(label)))[:count])


def feature_layer(model: nn.Module, edited: str = "auto", candidates: list[str] | None = None,
                  images: Tensor | None = None) -> str:
    """The layer at whose input the feature inversion acts: the editable convolution before the ``edited`` one
    (``auto``: before the last editable convolution), or the edited layer itself where no convolution precedes it.
    A block below the edit, a warping trigger's features still have a spatial layout and stand apart from the
    natural classes' (docs/results/cifar10.md, trigger unknown).

    With ``auto`` and the edit's ``candidates`` (layer names, definition order) of which one comes *before* that
    convolution (the corrected project convs ``auto`` adds behind a MobileNet's pooled head), the inversion moves
    to the last convolution before the earliest candidate whose output is the whole representation: no skip path
    bypasses it (:func:`~lightning_backdoor.defenses.residual.bypassed`) and, probed with ``images`` (N >= 1, C, H,
    W) where given, it reads more than one position per image (not a squeeze-excitation gate on pooled features).
    Every candidate then sees the feature trigger; acting after some of them, the trigger would leave the edit only
    the later ones (a MobileNetV3-Small kept 68 % ASR, its floor 8 %: docs/results/mobilenet.md). Where no such
    convolution exists the rule above stands."""
    layers = editable_layers(model)
    convolutions = [name for name in layers if isinstance(get_layer(model, name), nn.Conv2d)]
    auto = edited == "auto"
    edited = (convolutions or layers)[-1] if auto else edited
    get_layer(model, edited)  # a wrong name fails with the list of valid ones
    earlier = [name for name in convolutions if layers.index(name) < layers.index(edited)]
    chosen = earlier[-1] if earlier else edited
    earliest = min((layers.index(name) for name in candidates or () if name in layers), default=len(layers))
    if not auto or earliest >= layers.index(chosen):
        return chosen
    before = [name for name in convolutions if layers.index(name) < earliest and not bypassed(model, name)]
    if images is not None and before:
        positions = key_positions(model, before, images[:1])
        before = [name for name in before if positions[name] > 1]
    return before[-1] if before else chosen
