"""Backdoor metrics on torchmetrics' own accuracy (correct under DDP): ASR, ASR floor, robust accuracy, and the DER
formula.

Definitions follow METHOD.md §2. Triggered samples carry an *attack label*: the label the attack wants
(``target_class`` for all-to-one, ``(y + 1) mod K`` for all-to-all), or ``-1`` for samples that do not count
(true label already the target). Under all-to-all every sample counts and there is no target class, so no
target-class accuracy either (``BackdoorMetrics(target_class=None)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

IGNORE = -1


class AttackSuccessRate(MulticlassAccuracy):
    """ASR: among triggered samples, the fraction predicted as their attack label; samples labelled ``-1`` are
    skipped. It is torchmetrics' micro-averaged accuracy against the attack labels with ``ignore_index=-1``.

    Fed with the *clean* versions of the same samples it gives the ASR floor.
    ``preds``: (N,) labels or (N, K) logits; ``attack_labels``: (N,), ``-1`` to skip a sample. With no sample
    counted, the rate is 0.
    """

    higher_is_better = False

    def __init__(self, num_classes: int | None = None, **kwargs: Any) -> None:
        """``num_classes``: optional (micro averaging needs none); given, predictions and labels are checked against
        it. ``kwargs``: torchmetrics' ``Metric`` options (``sync_on_compute``...)."""
        super().__init__(num_classes, average="micro", ignore_index=IGNORE, **kwargs)

    def update(self, preds: Tensor, attack_labels: Tensor) -> None:  # type: ignore[override]
        super().update(preds, attack_labels)


class RobustAccuracy(MulticlassAccuracy):
    """RA: among triggered samples (attack label not ``-1``), the fraction predicted as their true label: micro
    accuracy against the true labels with the skipped samples' labels set to ``ignore_index=-1``."""

    higher_is_better = True

    def __init__(self, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_classes, average="micro", ignore_index=IGNORE, **kwargs)

    def update(self, preds: Tensor, labels: Tensor, attack_labels: Tensor) -> None:  # type: ignore[override]
        super().update(preds, torch.where(attack_labels == IGNORE, IGNORE, labels))


class BackdoorMetrics(nn.Module):
    """CA, per-class accuracy, target-class accuracy, ASR, ASR floor and RA of one evaluation pass.

    Its members, by what they are fed: the collection ``clean`` (CA, per-class accuracy) on clean predictions and
    true labels; the collection ``triggered`` (ASR, RA) on triggered predictions, true and attack labels; and
    ``asr_floor``, the ASR of the clean predictions. Every member sums its states across processes (DDP-correct).
    """

    def __init__(self, num_classes: int, target_class: int | None = None, sync_on_compute: bool = True) -> None:
        """``target_class=None`` (all-to-all, or unknown): no ``target_acc``, never another class's accuracy.
        ``sync_on_compute=False``: compute on this process's data only (no collective call under DDP)."""
        super().__init__()
        self.target_class = target_class
        sync = {"sync_on_compute": sync_on_compute}
        # compute_groups off: members fed different targets may hold equal states after one batch, and grouping
        # them then would make one a copy of the other.
        self.clean = MetricCollection({"clean_acc": MulticlassAccuracy(num_classes, average="micro", **sync),
                                       "per_class_acc": MulticlassAccuracy(num_classes, average=None, **sync)},
                                      compute_groups=False)
        self.triggered = MetricCollection({"asr": AttackSuccessRate(num_classes, **sync),
                                           "robust_acc": RobustAccuracy(num_classes, **sync)}, compute_groups=False)
        self.asr_floor = AttackSuccessRate(num_classes, **sync)

    def update(self, logits: Tensor, labels: Tensor, triggered_logits: Tensor | None = None,
               attack_labels: Tensor | None = None) -> None:
        """``logits``/``triggered_logits``: (N, K) on clean/triggered images; ``labels``, ``attack_labels``: (N,)."""
        self.clean.update(logits, labels)
        if triggered_logits is not None and attack_labels is not None:
            # each member takes the keyword arguments its update names (ASR: attack_labels; RA: both)
            self.triggered.update(triggered_logits, labels=labels, attack_labels=attack_labels)
            self.asr_floor.update(logits, attack_labels)

    def compute(self) -> dict[str, Tensor]:
        """Scalar metrics as fractions in [0, 1]; ``per_class_acc`` is a (K,) tensor."""
        out = self.clean.compute()
        if self.target_class is not None:
            out["target_acc"] = out["per_class_acc"][self.target_class]
        if self.asr_floor.update_called:
            triggered = self.triggered.compute()
            out |= {"asr": triggered["asr"], "asr_floor": self.asr_floor.compute(),
                    "robust_acc": triggered["robust_acc"]}
        return out

    def reset(self) -> None:
        for metrics in (self.clean, self.triggered, self.asr_floor):
            metrics.reset()


def defense_effectiveness_rating(asr_before: float, asr_after: float, ca_before: float, ca_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔCA) + 1] / 2 with Δ = before − after; fractions in, a value in [0, 1] out."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1.0) / 2.0
