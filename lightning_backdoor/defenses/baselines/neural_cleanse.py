"""Neural Cleanse unlearning (NC; Wang et al., IEEE S&P 2019): reverse-engineer a trigger per class, flag the
anomalously small one, and fine-tune on U with that trigger stamped on part of the images under their true labels.

It is the composition of two parts: the estimation (:class:`TriggerEstimator` with Neural Cleanse's inversion and
index) and :class:`Unlearning` with a trigger, composed by :class:`EstimateFirst`.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.defenses.base import DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.baselines.training import train
from lightning_backdoor.defenses.estimate_first import EstimateFirst
from lightning_backdoor.defenses.estimation import TriggerEstimator


@DEFENSES.register("unlearning")
class Unlearning(Defense):
    """Fine-tune on U with the backdoor's trigger stamped on a share of every batch under the true labels, so the
    model learns to ignore it. Needs the trigger (the first of the knowledge's triggers is used).

    Args:
        stamped_share: share of every fine-tuning batch stamped with the trigger (Neural Cleanse's 20 %).
        epochs, lr, batch_size: the fine-tune (as in ``ft``).
    """

    requires_knowledge = True

    def __init__(self, stamped_share: float = 0.2, epochs: int = 20, lr: float = 0.01, batch_size: int = 64) -> None:
        self.stamped_share, self.epochs, self.lr, self.batch_size = stamped_share, epochs, lr, batch_size

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        trigger = self.require(knowledge).trigger
        start = time.perf_counter()

        def loss_fn(network: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
            stamped = torch.rand(len(labels), device=images.device) < self.stamped_share
            images = torch.where(stamped[:, None, None, None], trigger(images), images)
            return F.cross_entropy(network(images), labels)

        loss = train(model, unseen, self.epochs, self.lr, self.batch_size, loss_fn=loss_fn)
        return DefenseResult(self.name, time.perf_counter() - start, details={"final_loss": loss})


@DEFENSES.register("nc")
class NeuralCleanseUnlearning(EstimateFirst):
    """Ignores the given trigger and target: estimates both with Neural Cleanse's mask-and-pattern inversion and
    its MAD anomaly index of the sizes themselves (as published), then :class:`Unlearning` with the flagged
    class's trigger; leaves the model unchanged when no class is anomalous (as the original method does).

    Args:
        stamped_share: share of every fine-tuning batch stamped with the reversed trigger (the paper's 20 %).
        max_steps: inversion steps (each optimises every class's candidate on one batch).
        threshold: anomaly index above which a class is flagged.
        epochs, lr, batch_size: the unlearning fine-tune (as in ``ft``).
        seed: fixes the inversion's start and batches.
    """

    def __init__(self, stamped_share: float = 0.2, max_steps: int = 300, threshold: float = 2.0, epochs: int = 20,
                 lr: float = 0.01, batch_size: int = 64, seed: int = 0) -> None:
        estimator = TriggerEstimator(estimators=("neural_cleanse",), threshold=threshold, log_scale=False,
                                     max_steps=max_steps, progress=False, seed=seed,
                                     prescreen_steps=None)  # every class inverted in full, as published
        super().__init__(Unlearning(stamped_share, epochs, lr, batch_size), estimator, every_candidate=False)

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        result = super().defend(model, unseen, None)
        result.method = self.name
        return result
