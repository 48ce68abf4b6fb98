"""The trigger as a victim's training augmentation shows it: mirrored by random horizontal flips and moved by random
crops applied after poisoning. A model trained that way learns these images of the trigger besides the trigger."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_backdoor.triggers.base import Trigger, acts_on_pixels

#: a trigger is local, and moved by :func:`distinct_shifts`, when its mask averages at most this over the image (a 3x3
#: patch on 32x32: 0.009). A crop moves a global trigger (a blend, a warp, a sinusoid) by a few pixels to nearly
#: itself, which an edit with the trigger removes already: on CIFAR-10 Blended its 16 moves of 4 px were left at
#: 0.0-2.9 % ASR (floor 1.1-1.8 %) by an edit without them, and adding them multiplied the edit's seconds by 5-10
LOCAL_TRIGGER = 0.25


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


class Shifted(Trigger):
    """``trigger`` moved by ``shift`` = (dy, dx) pixels (down and right for positive values), as a random crop of a
    triggered training image shows it: the change the trigger makes to the image moved by (−dy, −dx), moved back;
    what it moves across the border is dropped, not wrapped. A 3x3 patch in the bottom-right corner moved by
    (−4, −4) sits 4 px up and left of the corner, the image around it unchanged.

    Training with random crops (padding 4 px, the field's CIFAR augmentation) after poisoning moves the trigger by
    up to 4 px in each direction, so the model learns it at those places. Measured on the CIFAR-10 BadNets model of
    ``configs/cifar10``: the patch moved 4 px inward succeeded on 93 % of the test images, and an edit with the
    trigger and its mirror image alone left it at 8.6 % (floor 1.9 %; docs/results/cifar10.md). Not registered by
    name: it wraps another trigger, which must act on pixels.

    Args:
        trigger: the trigger to move (images (N, C, H, W) or one (C, H, W), in [0, 1]).
        shift: (dy, dx), two integers in pixels, each smaller in size than the image's height and width.

    Raises:
        ValueError: ``shift`` not two integers; on applying, a move as large as the image (nothing would be left).
    """

    def __init__(self, trigger: Trigger, shift: tuple[int, int]) -> None:
        super().__init__(trigger.seed)
        if (not isinstance(shift, (tuple, list)) or len(shift) != 2
                or not all(isinstance(value, int) and not isinstance(value, bool) for value in shift)):
            raise ValueError(f"shift={shift!r} must be two integers (dy, dx) in pixels")
        self.trigger = trigger
        self.shift = (shift[0], shift[1])

    def apply(self, images: Tensor) -> Tensor:
        self._check_size(images.shape[-2:])
        dy, dx = self.shift
        moved = images.roll((-dy, -dx), dims=(-2, -1))
        change = (self.trigger(moved) - moved).roll((dy, dx), dims=(-2, -1))
        return images + change * self._inside(images.shape[-2:], images.device, images.dtype)

    def mask(self, image_shape: tuple[int, int, int]) -> Tensor | None:
        mask = self.trigger.mask(image_shape)
        if mask is None:
            return None
        return mask.roll(self.shift, dims=(-2, -1)) * self._inside(mask.shape[-2:], mask.device, mask.dtype)

    def check(self, image_shape: tuple[int, int, int]) -> None:
        self.trigger.check(image_shape)
        self._check_size(image_shape[1:])

    def _check_size(self, size: tuple[int, ...]) -> None:
        if abs(self.shift[0]) >= size[0] or abs(self.shift[1]) >= size[1]:
            raise ValueError(f"shift {self.shift} must be smaller than the image's {size[0]}x{size[1]} pixels")

    def _inside(self, size: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(H, W): 1 where the moved change came from inside the image, 0 on the band it wrapped across."""
        keep = torch.ones(tuple(size), device=device, dtype=dtype)
        dy, dx = self.shift
        keep[slice(0, dy) if dy > 0 else slice(size[0] + dy, size[0])] = 0  # an empty slice for dy = 0
        keep[:, slice(0, dx) if dx > 0 else slice(size[1] + dx, size[1])] = 0
        return keep


def distinct_mirror(trigger: Trigger, images: Tensor) -> Mirrored | None:
    """``Mirrored(trigger)`` when ``trigger`` acts on pixels and its mirror image differs from it on the first two of
    ``images`` ((N, C, H, W) in [0, 1], N >= 1); ``None`` for a feature-space trigger or one that is its own mirror
    image (e.g. a pattern symmetric about the vertical axis), which need no measuring or editing of their own."""
    return _distinct(trigger, Mirrored(trigger), images)


def distinct_shifts(trigger: Trigger, distance: int, images: Tensor) -> list[Shifted]:
    """A local ``trigger`` (:data:`LOCAL_TRIGGER`) moved by ``distance`` pixels along each axis and both (up to 8
    moves: (±d, 0), (0, ±d), (±d, ±d)), each kept when it differs, on the first two of ``images`` ((N, C, H, W) in
    [0, 1]), both from the trigger (a pattern constant along that axis) and from the images untouched (a patch moved
    wholly out of the image); ``[]`` for ``distance`` 0, a global trigger (no mask, or a wide one) or a feature-space
    trigger.

    Raises:
        ValueError: ``distance`` not an integer >= 0, or not smaller than the images; ``images`` not (N, C, H, W).
    """
    if isinstance(distance, bool) or not isinstance(distance, int) or distance < 0:
        raise ValueError(f"distance={distance!r} must be an integer number of pixels >= 0")
    if images.dim() != 4:
        raise ValueError(f"images must be a batch (N, C, H, W); got shape {tuple(images.shape)}")
    if distance == 0 or len(images) == 0:
        return []
    if distance >= min(images.shape[-2:]):
        raise ValueError(f"distance={distance} must be smaller than the images' {images.shape[-2]}x{images.shape[-1]} "
                         f"pixels (every move would leave the image)")
    mask = trigger.mask(tuple(images.shape[1:]))
    if mask is None or float(mask.float().mean()) > LOCAL_TRIGGER:
        return []
    moves = [(dy, dx) for dy in (-distance, 0, distance) for dx in (-distance, 0, distance) if (dy, dx) != (0, 0)]
    kept = []
    for move in moves:
        shifted = _distinct(trigger, Shifted(trigger, move), images)
        if shifted is not None and not torch.equal(shifted(images[:2].float()), images[:2].float()):
            kept.append(shifted)
    return kept


def _distinct(trigger: Trigger, variant: Trigger, images: Tensor) -> Trigger | None:
    """``variant`` when ``trigger`` acts on pixels and ``variant`` differs from it on the first two ``images``."""
    if not acts_on_pixels(trigger) or len(images) == 0:
        return None
    images = images[:2].float()
    return None if torch.equal(variant(images), trigger(images)) else variant


def crop_distance(images: Tensor) -> int:
    """The pixels the field's random crop moves ``images`` (N, C, H, W) by: 1/8 of their width, at least 1 (4 px on
    32x32: CIFAR's padding of 4); 0 where that is not smaller than the images, or for inputs that are not images."""
    if images.dim() != 4:
        return 0
    distance = max(1, images.shape[-1] // 8)
    return distance if distance < min(images.shape[-2:]) else 0


def augmentation_images(trigger: Trigger, images: Tensor, distance: int | None = None
                        ) -> tuple[Mirrored | None, list[Shifted]]:
    """What a flip and a crop of ``distance`` pixels (``None``: :func:`crop_distance`) make of ``trigger``, to
    measure: its mirror image (:func:`distinct_mirror`) and the moves of the trigger and of that mirror image
    (:func:`distinct_shifts`), decided on the first two of ``images`` ((N, C, H, W) in [0, 1])."""
    distance = crop_distance(images) if distance is None else distance
    mirrored = distinct_mirror(trigger, images)
    moves = [move for each in (trigger, mirrored) if each is not None
             for move in distinct_shifts(each, distance, images)]
    return mirrored, moves
