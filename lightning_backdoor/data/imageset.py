"""ImageSet: decoded uint8 images with their labels and class names, and the one resize every source uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class ImageSet:
    """Images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64, and class names indexed by label."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.classes)

    def missing_classes(self) -> tuple[str, ...]:
        """Names of the classes no image is labelled with, in class order (empty when every class has images)."""
        counts = torch.bincount(self.labels, minlength=len(self.classes))
        return tuple(name for name, count in zip(self.classes, counts.tolist()) if count == 0)


def resize_square(images: Tensor, size: int | None) -> Tensor:
    """Resize uint8 images ``(C, H, W)`` or ``(N, C, H, W)`` to ``size`` x ``size`` pixels (bilinear, antialiased).

    Returns the input itself when ``size`` is None or the images already have that size.
    """
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    batch = images if images.ndim == 4 else images[None]
    resized = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    resized = resized.round().clamp(0, 255).to(torch.uint8)
    return resized if images.ndim == 4 else resized[0]
