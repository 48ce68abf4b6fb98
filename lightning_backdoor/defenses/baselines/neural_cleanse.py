"""Neural Cleanse unlearning (NC; Wang et al. 2019): reverse-engineer a trigger per class, flag the anomalously
small one, and fine-tune on U with that trigger stamped on part of the images under their true labels."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.defenses.base import Defense, UnseenData
from lightning_backdoor.defenses.baselines.training import train
from lightning_backdoor.triggers import Trigger


class NeuralCleanseUnlearning(Defense):
    """Ignores the given trigger and target: estimates both with Neural Cleanse's mask-and-pattern inversion and
    the MAD anomaly index (``lightning_backdoor.defenses.estimation``); leaves the model unchanged when no class is
    anomalous (as the original method does).

    Args:
        stamped_share: share of every fine-tuning batch stamped with the reversed trigger (the paper's 20 %).
        max_steps: inversion steps (each optimises every class's candidate on one batch).
        threshold: anomaly index above which a class is flagged.
        epochs, lr, batch_size: the unlearning fine-tune (as in ``ft``).
        seed: fixes the inversion's start and batches.
    """

    name = "nc"

    def __init__(self, stamped_share: float = 0.2, max_steps: int = 300, threshold: float = 2.0, epochs: int = 20,
                 lr: float = 0.01, batch_size: int = 64, seed: int = 0) -> None:
        self.stamped_share, self.max_steps, self.threshold = stamped_share, max_steps, threshold
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed

    def defend(self, model: nn.Module, unseen: UnseenData, trigger: Trigger | None,
               target_class: int | None) -> dict[str, Any]:
        from lightning_backdoor.defenses.estimation import TriggerEstimator  # issue 4's estimator, shared

        start = time.perf_counter()
        estimator = TriggerEstimator(estimators=("neural_cleanse",), threshold=self.threshold, log_scale=False,
                                     max_steps=self.max_steps, progress=False, seed=self.seed)  # the index as published
        estimate = estimator.estimate(model, unseen)
        info: dict[str, Any] = {"method": self.name, "estimation": estimate.report(),
                                "backdoor_found": estimate.target_class is not None}
        if estimate.trigger is None:
            return info | {"seconds": time.perf_counter() - start}
        reversed_trigger = estimate.trigger

        def loss_fn(network: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
            stamped = torch.rand(len(labels), device=images.device) < self.stamped_share
            images = torch.where(stamped[:, None, None, None], reversed_trigger(images), images)
            return F.cross_entropy(network(images), labels)

        loss = train(model, unseen, self.epochs, self.lr, self.batch_size, loss_fn=loss_fn)
        return info | {"final_loss": loss, "seconds": time.perf_counter() - start}
