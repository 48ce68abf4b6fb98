"""Backdoor metrics as torchmetrics (correct under DDP): ASR, ASR floor, robust accuracy, and the DER formula.

Definitions follow METHOD.md §2. Triggered samples carry an *attack label*: the label the attack wants
(``target_class`` for all-to-one, ``(y + 1) mod K`` for all-to-all), or ``-1`` for samples that do not count
(true label already the target). Under all-to-all every sample counts and there is no target class, so no
target-class accuracy either (``BackdoorMetrics(target_class=None)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

IGNORE = -1


def _as_preds(preds_or_logits: Tensor) -> Tensor:
    return preds_or_logits.argmax(dim=-1) if preds_or_logits.ndim == 2 else preds_or_logits


class _MaskedHitRate(Metric):
    """Fraction of included samples whose prediction equals a reference label (summed states: DDP-correct)."""

    is_differentiable = False
    full_state_update = False
    hits: Tensor
    total: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _accumulate(self, preds: Tensor, reference: Tensor, attack_labels: Tensor) -> None:
        included = attack_labels != IGNORE
        self.hits += (_as_preds(preds)[included] == reference[included]).sum()
        self.total += included.sum()

    def compute(self) -> Tensor:
        return self.hits.float() / self.total.clamp(min=1)


class AttackSuccessRate(_MaskedHitRate):
    """ASR: among triggered samples, the fraction predicted as their attack label.

    Fed with the *clean* versions of the same samples it gives the ASR floor.
    ``preds``: (N,) labels or (N, K) logits; ``attack_labels``: (N,), ``-1`` to skip a sample.
    """

    higher_is_better = False

    def update(self, preds: Tensor, attack_labels: Tensor) -> None:
        self._accumulate(preds, attack_labels, attack_labels)


class RobustAccuracy(_MaskedHitRate):
    """RA: among triggered samples (attack label not ``-1``), the fraction predicted as their true label."""

    higher_is_better = True

    def update(self, preds: Tensor, labels: Tensor, attack_labels: Tensor) -> None:
        self._accumulate(preds, labels, attack_labels)


class BackdoorMetrics(nn.Module):
    """CA, per-class accuracy, target-class accuracy, ASR, ASR floor and RA of one evaluation pass."""

    def __init__(self, num_classes: int, target_class: int | None = None, sync_on_compute: bool = True) -> None:
        """``target_class=None`` (all-to-all, or unknown): no ``target_acc``, never another class's accuracy.
        ``sync_on_compute=False``: compute on this process's data only (no collective call under DDP)."""
        super().__init__()
        self.target_class = target_class
        sync = {"sync_on_compute": sync_on_compute}
        self.clean_acc = MulticlassAccuracy(num_classes, average="micro", **sync)
        self.per_class_acc = MulticlassAccuracy(num_classes, average=None, **sync)
        self.asr = AttackSuccessRate(**sync)
        self.asr_floor = AttackSuccessRate(**sync)
        self.robust_acc = RobustAccuracy(**sync)

    def update(self, logits: Tensor, labels: Tensor, triggered_logits: Tensor | None = None,
               attack_labels: Tensor | None = None) -> None:
        """``logits``/``triggered_logits``: (N, K) on clean/triggered images; ``labels``, ``attack_labels``: (N,)."""
        self.clean_acc.update(logits, labels)
        self.per_class_acc.update(logits, labels)
        if triggered_logits is not None and attack_labels is not None:
            self.asr.update(triggered_logits, attack_labels)
            self.asr_floor.update(logits, attack_labels)
            self.robust_acc.update(triggered_logits, labels, attack_labels)

    def compute(self) -> dict[str, Tensor]:
        """Scalar metrics as fractions in [0, 1]; ``per_class_acc`` is a (K,) tensor."""
        per_class = self.per_class_acc.compute()
        out = {"clean_acc": self.clean_acc.compute(), "per_class_acc": per_class}
        if self.target_class is not None:
            out["target_acc"] = per_class[self.target_class]
        if self.asr.update_called:
            out |= {"asr": self.asr.compute(), "asr_floor": self.asr_floor.compute(),
                    "robust_acc": self.robust_acc.compute()}
        return out

    def reset(self) -> None:
        for metric in (self.clean_acc, self.per_class_acc, self.asr, self.asr_floor, self.robust_acc):
            metric.reset()


def defense_effectiveness_rating(asr_before: float, asr_after: float, ca_before: float, ca_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔCA) + 1] / 2 with Δ = before − after; fractions in, a value in [0, 1] out."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1.0) / 2.0
