"""Fine-tuning (FT): retrain the whole model on the unseen clean images."""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from lightning_backdoor.defenses.base import Defense, UnseenData
from lightning_backdoor.defenses.baselines.training import train
from lightning_backdoor.triggers import Trigger


class FineTuning(Defense):
    """Fine-tune every weight on U with SGD and standard augmentation; needs no backdoor knowledge.

    Args:
        epochs: passes over U.
        lr: SGD learning rate (momentum 0.9, weight decay 5e-4).
        batch_size: images per step.
    """

    name = "ft"

    def __init__(self, epochs: int = 20, lr: float = 0.01, batch_size: int = 64) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def defend(self, model: nn.Module, unseen: UnseenData, trigger: Trigger | None,
               target_class: int | None) -> dict[str, Any]:
        start = time.perf_counter()
        loss = train(model, unseen, self.epochs, self.lr, self.batch_size)
        return {"method": self.name, "final_loss": loss, "seconds": time.perf_counter() - start}
