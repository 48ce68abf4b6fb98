"""A plain PyTorch training loop over a data module's (poisoned) training batches, for tests that train a model
outside Lightning."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lightning_backdoor import PoisonedDataModule


def train_epochs(model: nn.Module, data: PoisonedDataModule, optimizer: torch.optim.Optimizer, epochs: int) -> None:
    """``epochs`` passes over ``data.train_dataloader()`` (batches through the module's ``on_after_batch_transfer``:
    augmentation as in a fit) with cross-entropy; ``data`` must be set up for ``fit``."""
    model.train()
    for _ in range(epochs):
        for batch in data.train_dataloader():
            images, labels = data.on_after_batch_transfer(list(batch), 0)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
