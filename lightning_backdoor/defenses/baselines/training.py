"""The small training loop every unlearning baseline shares, plus splitting U and scoring on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.data.augment import shift_and_flip
from lightning_backdoor.defenses.base import UnseenData
from lightning_backdoor.evaluation import clean_accuracy

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def cross_entropy(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """The plain fine-tuning loss."""
    return F.cross_entropy(model(images), labels)


def shuffled_batches(count: int, batch_size: int) -> Iterator[Tensor]:
    """Index batches of one epoch over ``count`` items, in random order (the global torch RNG)."""
    yield from torch.randperm(count).split(batch_size)


def train(model: nn.Module, unseen: UnseenData, epochs: int, lr: float, batch_size: int = 64,
          loss_fn: LossFn = cross_entropy, after_step: Callable[[], None] | None = None,
          milestones: tuple[int, ...] = (), momentum: float = 0.9, weight_decay: float = 5e-4,
          use_augmentation: bool = True, before_step: Callable[[Tensor, Tensor], None] | None = None,
          cosine: bool = False) -> float:
    """SGD on U for ``epochs`` epochs (lr ÷ 10 at each milestone epoch), in train mode; returns the last loss.

    ``before_step`` runs between the backward pass and the optimizer step with the batch's (augmented) images and
    labels, and may replace the gradients (e.g. with sharpness-aware minimisation's second pass). ``after_step``
    runs after every optimizer step (e.g. to keep pruned weights at zero). ``cosine``: anneal the lr along a
    cosine from ``lr`` to 0 over the epochs instead of the milestones.

    Raises:
        ValueError: both ``cosine`` and ``milestones``.
    """
    if cosine and milestones:
        raise ValueError("train takes either milestones or a cosine schedule, not both")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs)) if cosine
                else torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), 0.1))
    was_training = model.training
    model.train()
    loss = torch.tensor(float("nan"))
    try:
        for _ in range(epochs):
            for batch in shuffled_batches(len(unseen.labels), batch_size):
                images = unseen.images[batch].float()
                images = shift_and_flip(images) if use_augmentation else images
                loss = loss_fn(model, images, unseen.labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if before_step is not None:
                    before_step(images, unseen.labels[batch])
                optimizer.step()
                if after_step is not None:
                    after_step()
            schedule.step()
    finally:
        model.train(was_training)
    return loss.item()


def split_unseen(unseen: UnseenData, validation_fraction: float) -> tuple[UnseenData, UnseenData]:
    """Split U per class into (fit, validation): every class gives about ``validation_fraction`` of its images
    (at least one) to validation when it has two or more; deterministic (the last images of each class)."""
    validation = torch.zeros(len(unseen.labels), dtype=torch.bool)
    for label in unseen.labels.unique():
        members = (unseen.labels == label).nonzero().flatten().cpu()
        if len(members) >= 2:
            held = max(1, round(validation_fraction * len(members)))
            validation[members[-held:]] = True
    validation = validation.to(unseen.labels.device)
    if not validation.any():
        raise ValueError("the unseen split needs at least two images of some class to hold one out for validation")
    return (UnseenData(unseen.images[~validation], unseen.labels[~validation]),
            UnseenData(unseen.images[validation], unseen.labels[validation]))


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Clean accuracy (fraction) of ``model`` in eval mode: the evaluation's own metric (CA of ``evaluate``)."""
    return clean_accuracy(model, images, labels)
