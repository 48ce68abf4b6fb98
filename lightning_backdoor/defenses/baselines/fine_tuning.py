"""Fine-tuning (FT): retrain the whole model on the unseen clean images."""

from __future__ import annotations

import time

from torch import nn

from lightning_backdoor.defenses.base import DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.baselines.training import train


@DEFENSES.register("ft")
class FineTuning(Defense):
    """Fine-tune every weight on U with SGD and standard augmentation; needs no backdoor knowledge.

    Args:
        epochs: passes over U.
        lr: SGD learning rate (momentum 0.9, weight decay 5e-4).
        batch_size: images per step.
    """

    def __init__(self, epochs: int = 20, lr: float = 0.01, batch_size: int = 64) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        start = time.perf_counter()
        loss = train(model, unseen, self.epochs, self.lr, self.batch_size)
        return DefenseResult(self.name, time.perf_counter() - start, details={"final_loss": loss})
