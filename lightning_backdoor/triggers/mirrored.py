"""The mirror image of a trigger: what a model trained with random horizontal flips learns besides the trigger."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_backdoor.triggers.base import Trigger, acts_on_pixels


class Mirrored(Trigger):
    """``trigger`` seen in a mirror: ``flip(trigger(flip(x)))``, ``flip`` the left-right flip of the width axis.

    Training with random horizontal flips (the field's CIFAR augmentation, and ``augment: auto`` here for colour
    images of 32 px or more) flips half of the poisoned images after the trigger is applied, so the model learns this
    trigger as well: a 3x3 patch in the bottom-left corner for one in the bottom-right. Measured on the CIFAR-10
    BadNets model of ``configs/cifar10``: the mirrored patch succeeded on 95.4 % of the test images, and an edit
    made with the given trigger alone left it at 94.1 % (docs/results/cifar10.md). Per-sample triggers are mirrored
    the same way (the pattern made for the flipped image, flipped back). Not registered by name: it wraps another
    trigger, which must act on pixels (not a feature-space trigger attached to a model).

    Args:
        trigger: the trigger to mirror (images (N, C, H, W) in [0, 1]).
    """

    def __init__(self, trigger: Trigger) -> None:
        super().__init__(trigger.seed)
        self.trigger = trigger

    def apply(self, images: Tensor) -> Tensor:
        return self.trigger(images.flip(-1)).flip(-1)

    def mask(self, image_shape: tuple[int, int, int]) -> Tensor | None:
        mask = self.trigger.mask(image_shape)
        return None if mask is None else mask.flip(-1)

    def check(self, image_shape: tuple[int, int, int]) -> None:
        self.trigger.check(image_shape)



def distinct_mirror(trigger: Trigger, images: Tensor) -> Mirrored | None:
    """``Mirrored(trigger)`` when ``trigger`` acts on pixels and its mirror image differs from it on the first two of
    ``images`` ((N, C, H, W) in [0, 1], N >= 1); ``None`` for a feature-space trigger or one that is its own mirror
    image (e.g. a pattern symmetric about the vertical axis), which need no measuring or editing of their own."""
    if not acts_on_pixels(trigger) or len(images) == 0:
        return None
    images = images[:2].float()
    mirrored = Mirrored(trigger)
    return None if torch.equal(mirrored(images), trigger(images)) else mirrored
