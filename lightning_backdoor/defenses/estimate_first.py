"""Any defense without backdoor knowledge: estimate the trigger and target first, then defend with the estimate."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor, nn

from lightning_backdoor.defenses.base import BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.estimation import TriggerEstimator
from lightning_backdoor.defenses.report import trigger_success_rate
from lightning_backdoor.evaluation import in_batches
from lightning_backdoor.triggers import Trigger


class EstimateFirst(Defense):
    """Estimate the backdoor with ``estimator`` on the unseen split, then run ``defense`` with the estimate as its
    :class:`BackdoorKnowledge`; leave the model unchanged when no class is flagged.

    What the defense is told is ignored: it always estimates (the protocol of defending without backdoor knowledge,
    METHOD.md §3). The result's ``details`` hold the estimation summary (``estimation``), its seconds
    (``estimation_seconds``) and those of what follows it (``editing_seconds``: the moved placements' check and the
    inner defense), which the result's ``seconds`` sums; ``estimated`` holds the flagged target with its main trigger and ``picture`` the trigger's
    image.

    Args:
        estimator: estimates target and trigger (default: :class:`TriggerEstimator` with default settings).
        defense: the defense that removes the estimated backdoor.
        every_candidate: hand the defense every candidate of the estimate (each flagging estimator's trigger at
            every strength, patch triggers also moved: :meth:`BackdoorEstimate.edit_triggers`), or only the main
            trigger (the flagged estimator's, as estimated).
        keep: a moved patch candidate is handed over only where it sends at least this fraction as many of the
            unseen non-target images to the target class as the candidate at its own place (0: all are).
    """

    def __init__(self, defense: Defense, estimator: TriggerEstimator | None = None,
                 every_candidate: bool = True, keep: float = 0.5) -> None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 <= keep <= 1:
            raise ValueError(f"keep={keep!r} must be a number in [0, 1] (0: every moved placement is kept)")
        self.defense = defense
        self.estimator = estimator if estimator is not None else TriggerEstimator()
        self.every_candidate, self.keep = every_candidate, keep

    def check_model(self, model: nn.Module, images: Tensor) -> None:
        """The wrapped defense's :meth:`~lightning_backdoor.defenses.base.Defense.check_model`."""
        self.defense.check_model(model, images)

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        """Estimate, then defend ``model`` in place with the estimate (``knowledge`` is ignored); what the defense
        refuses on this model (:meth:`check_model`) is refused before the estimation. A defense that chooses its
        layer (``layer: auto``) among ``candidate_layers`` has the feature inversion placed before all of them."""
        self.check_model(model, unseen.images[:2])
        layer = getattr(self.defense, "layer", "auto")
        choices = getattr(self.defense, "candidate_layers", None)
        candidates = choices(model, unseen.images[:2].float()) if layer == "auto" and choices is not None else None
        given = {} if candidates is None else {"candidates": candidates}  # an estimator of the older signature
        estimate = self.estimator.estimate(model, unseen, layer, **given)
        details = {"trigger_known": False, "estimation": estimate.report(), "estimation_seconds": estimate.seconds}
        if estimate.target_class is None or estimate.trigger is None:
            return DefenseResult(method=f"{self.defense.name}/no_backdoor_found", seconds=estimate.seconds,
                                 details=details | {"editing_seconds": 0.0})
        started = time.perf_counter()  # the placements' check counts with the edit: both come after the estimate
        if self.every_candidate:
            every = estimate.edit_triggers()
            triggers = estimate.edit_triggers(success_on(model, unseen, estimate.target_class), self.keep)
            in_place = len(estimate.candidates) * len(estimate.strengths)
            details["estimation"]["placements"] = (f"{len(triggers) - in_place} of {len(every) - in_place} moved "
                                                   f"placements act and were kept")
        else:
            triggers = [estimate.trigger]
        result = self.defense.defend(model, unseen, BackdoorKnowledge.of(triggers, estimate.target_class))
        seconds = time.perf_counter() - started
        result.details = result.details | details | {"editing_seconds": seconds}
        result.seconds = estimate.seconds + seconds
        result.estimated = BackdoorKnowledge.of(estimate.trigger, estimate.target_class)
        result.picture = estimate.picture
        return result


def success_on(model: nn.Module, unseen: UnseenData, target_class: int) -> Callable[[Trigger], float]:
    """``trigger -> fraction`` of ``unseen``'s images not of ``target_class`` that ``model`` assigns to
    ``target_class`` once ``trigger`` is applied (:func:`~lightning_backdoor.defenses.report.trigger_success_rate`,
    the estimated ASR of the report, on U)."""
    batches = in_batches(unseen.images.float(), unseen.labels)
    return lambda trigger: trigger_success_rate(model, trigger, target_class, batches)


def without_knowledge(defense: Defense, seed: int | None = None) -> Defense:
    """``defense`` as it runs without backdoor knowledge: unchanged when it needs none (or estimates itself), else
    composed as ``EstimateFirst(defense, TriggerEstimator(seed=...))`` with the defense's own ``seed`` (or
    ``seed``)."""
    if not defense.requires_knowledge or isinstance(defense, EstimateFirst):
        return defense
    seed = seed if seed is not None else int(getattr(defense, "seed", 0))
    return EstimateFirst(defense, TriggerEstimator(seed=seed))
