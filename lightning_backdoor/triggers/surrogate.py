"""The attacker's surrogate model for triggers made with a model: built from the model registry, trained briefly on
the clean training images in a plain seeded CPU loop, and turned into flat tensors for the preparation cache."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.models import build_model
from lightning_backdoor.triggers.base import PreparedTrigger

#: The surrogate's settings when a trigger gives none for ``compact``: a quarter of the CIFAR configs' widths.
DEFAULT_COMPACT_KWARGS: dict[str, Any] = {"widths": [32, 64, 128]}
#: Images smaller than this (pixels, the shorter side) are upsampled by a whole factor before the surrogate: the
#: compact net needs 9 pixels and halves the side three times (``digits`` are 8 x 8).
MIN_SIDE = 16


class Upsampled(nn.Module):
    """``net`` on images upsampled ``factor`` times (nearest): a surrogate for images smaller than it takes.

    Input ``(N, C, H, W)``, logits ``(N, K)``; ``net`` keeps its own layer names (``upsampled.net.head``)."""

    def __init__(self, net: nn.Module, factor: int) -> None:
        super().__init__()
        self.net = net
        self.factor = factor

    def forward(self, images: Tensor) -> Tensor:
        return self.net(F.interpolate(images, scale_factor=self.factor, mode="nearest"))


def check_surrogate_settings(owner: str, epochs: int, images: int) -> None:
    """Raise a one-line ``ValueError`` for a surrogate trained for no epoch or on no image."""
    if epochs < 1:
        raise ValueError(f"{owner} surrogate_epochs must be >= 1; got {epochs}")
    if images < 1:
        raise ValueError(f"{owner} surrogate_images must be >= 1; got {images}")


def build_surrogate(architecture: str, kwargs: dict[str, Any] | None, num_classes: int,
                    image_shape: tuple[int, int, int]) -> nn.Module:
    """The surrogate for images of ``image_shape`` (C, H, W): ``build_model(architecture, ...)`` with ``kwargs``
    (for ``compact`` without kwargs: :data:`DEFAULT_COMPACT_KWARGS`), wrapped in :class:`Upsampled` when the
    shorter side is below :data:`MIN_SIDE`. Raises the registry's one-line ``ValueError`` for an unknown name."""
    if kwargs is None:
        kwargs = dict(DEFAULT_COMPACT_KWARGS) if architecture == "compact" else {}
    net = build_model(architecture, num_classes=num_classes, in_channels=image_shape[0], **kwargs)
    side = min(image_shape[1:])
    return Upsampled(net, math.ceil(MIN_SIDE / side)) if side < MIN_SIDE else net


def inner(model: nn.Module) -> nn.Module:
    """The network itself: ``model.net`` for an :class:`Upsampled` surrogate, else ``model``."""
    return model.net if isinstance(model, Upsampled) else model


def train_surrogate(model: nn.Module, images: Tensor, labels: Tensor, epochs: int, max_images: int,
                    generator: torch.Generator, batch_size: int = 128, lr: float = 0.05) -> nn.Module:
    """Train ``model`` (CPU) on at most ``max_images`` of ``images`` ``(N, C, H, W)`` float in [0, 1] with
    ``labels`` ``(N,)``: SGD (Nesterov momentum 0.9, weight decay 5e-4) with the learning rate rising linearly to
    ``lr`` over the first fifth of the steps and falling linearly to 0 after (the CIFAR configs' one-cycle shape),
    random horizontal flips for colour images. The subset, the batch order and the flips come from ``generator``;
    the weights' initialisation from the global RNG (seeded by :meth:`PreparedTrigger.prepare`). Returns ``model``
    in eval mode.

    Budget: ``epochs * min(N, max_images)`` image passes, e.g. 3 x 10,000 on CIFAR-10 with the default compact
    surrogate (widths 32, 64, 128): under a minute on 2 CPU cores (estimated from its FLOPs, not yet timed);
    the bundled ``digits``: about a second per epoch.
    """
    if len(images) > max_images:
        chosen = torch.randperm(len(images), generator=generator)[:max_images]
        images, labels = images[chosen], labels[chosen]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = one_cycle(optimizer, epochs * max(1, len(images) // batch_size))
    model.train()
    for _ in range(epochs):
        for batch in epoch_batches(len(images), batch_size, generator):
            loss = F.cross_entropy(model(random_flips(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def epoch_batches(count: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch's batches of indices into ``count`` images in an order drawn from ``generator``: full batches of
    ``batch_size`` (the last partial one dropped), or one batch of all of them when there are fewer."""
    order = torch.randperm(count, generator=generator)
    steps = count // batch_size
    return list(order[: steps * batch_size].view(steps, batch_size)) if steps else [order]


def random_flips(images: Tensor, generator: torch.Generator) -> Tensor:
    """``images`` ``(N, C, H, W)``, each colour image mirrored left-right with probability 1/2 (drawn from
    ``generator``); grey images unchanged, drawing nothing."""
    if images.shape[1] != 3:
        return images
    mirrored = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(mirrored[:, None, None, None], images.flip(-1), images)


def one_cycle(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The CIFAR configs' one-cycle shape over ``total`` steps: the learning rate rises linearly to its set value over
    the first fifth, then falls linearly to 0."""
    warmup = max(1, total // 5)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup)))


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """The fraction of ``images`` (N, C, H, W) in [0, 1] that ``model`` (eval mode) labels as ``labels`` (N,)."""
    with torch.inference_mode():
        correct = sum(int((model(chunk).argmax(1) == target).sum())
                      for chunk, target in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / max(1, len(labels))


def weights_to_tensors(model: nn.Module, prefix: str = "surrogate.") -> dict[str, Tensor]:
    """The model's state dict as plain CPU tensors under ``prefix`` (for a tensors-only cache file)."""
    return {prefix + name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


def load_weights(model: nn.Module, tensors: dict[str, Tensor], prefix: str = "surrogate.") -> nn.Module:
    """Load the weights :func:`weights_to_tensors` stored under ``prefix`` into ``model``; returns it in eval mode."""
    model.load_state_dict({name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)})
    return model.eval()


class SurrogateTrigger(PreparedTrigger):
    """A :class:`~lightning_backdoor.triggers.base.PreparedTrigger` whose :meth:`make` starts from a surrogate trained
    on the attacker's clean training images (Low Frequency, TrojanNN, Label-Consistent): the four surrogate settings
    they all take, checked and kept once here, and the surrogate built and trained from them.

    A subclass takes ``surrogate``, ``surrogate_kwargs``, ``surrogate_epochs`` and ``surrogate_images`` in its own
    constructor (so the CLI lists them with their defaults) and passes them to :meth:`keep_surrogate_settings` where
    it keeps its other settings: the attributes' order is the ``repr``'s, which is part of the preparation cache key.
    """

    surrogate: str
    surrogate_kwargs: dict[str, Any] | None
    surrogate_epochs: int
    surrogate_images: int

    def keep_surrogate_settings(self, surrogate: str, surrogate_kwargs: dict[str, Any] | None, surrogate_epochs: int,
                                surrogate_images: int) -> None:
        """Check (:func:`check_surrogate_settings`, one-line ``ValueError``) and keep the surrogate's architecture
        name, its builder's arguments, its training epochs and its image budget."""
        check_surrogate_settings(self.name or type(self).__name__, surrogate_epochs, surrogate_images)
        self.surrogate = surrogate
        self.surrogate_kwargs = surrogate_kwargs
        self.surrogate_epochs = surrogate_epochs
        self.surrogate_images = surrogate_images

    def build_surrogate(self, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
        """The untrained surrogate for ``num_classes`` classes and images of ``image_shape`` (C, H, W)."""
        return build_surrogate(self.surrogate, self.surrogate_kwargs, num_classes, image_shape)

    def trained_surrogate(self, images: Tensor, labels: Tensor, num_classes: int,
                          generator: torch.Generator) -> nn.Module:
        """The surrogate trained (:func:`train_surrogate`) on ``images`` ``(N, C, H, W)`` in [0, 1] and ``labels``
        ``(N,)``, the subset and batch order drawn from ``generator``; frozen, in eval mode, on the CPU."""
        model = self.build_surrogate(num_classes, tuple(images.shape[1:]))
        return frozen(train_surrogate(model, images, labels, self.surrogate_epochs, self.surrogate_images, generator))

    def preparation_summary(self, images: Tensor) -> str:
        compact_default = self.surrogate == "compact" and self.surrogate_kwargs is None
        kwargs = " (widths 32, 64, 128)" if compact_default else (f" {self.surrogate_kwargs}"
                                                                  if self.surrogate_kwargs else "")
        return (f"trains a {self.surrogate}{kwargs} surrogate for {self.surrogate_epochs} epoch(s) on "
                f"{min(len(images), self.surrogate_images):,} of them")


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring gradients (attacks differentiate the input only)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()
