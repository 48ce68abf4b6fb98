"""A user's own trigger: a pattern image pasted through a mask image, or blended at a fixed opacity."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger
from lightning_backdoor.triggers.blended import check_file, load_image


@TRIGGERS.register("custom")
class CustomTrigger(Trigger):
    """``x' = (1 - m) * x + m * pattern`` where ``m`` is a mask image, or ``alpha`` everywhere.

    Images are resized to the data's ``(H, W)``; the pattern is converted to the data's channels, the mask read as
    greyscale scaled to [0, 1] and resized by nearest neighbour so a binary mask stays binary.

    Args:
        image: path to the pattern image.
        mask: path to the mask image (white: the pattern replaces the pixel; black: the pixel is kept).
        alpha: opacity in (0, 1] of the pattern on every pixel, instead of a mask.
        seed: unused (the trigger is fixed); kept so every trigger takes the same arguments.
    """

    def __init__(self, image: str, mask: str | None = None, alpha: float | None = None, seed: int = 0) -> None:
        super().__init__(seed)
        if (mask is None) == (alpha is None):
            raise ValueError(
                "give the custom trigger exactly one of mask (a mask image file) or alpha (an opacity in (0, 1]); "
                f"got mask={mask!r}, alpha={alpha!r}"
            )
        if alpha is not None and not 0.0 < alpha <= 1.0:
            raise ValueError(f"custom trigger alpha must be in (0, 1]; got {alpha}")
        check_file(image, "custom trigger image")
        if mask is not None:
            check_file(mask, "custom trigger mask")
        self.image = image
        # Stored under another name: an attribute called ``mask`` would hide the ``mask()`` method.
        self.mask_file = mask
        self.alpha = alpha
        self._cache: dict[tuple, tuple[Tensor, Tensor | float]] = {}

    def _parts(
        self, image_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | float]:
        key = (tuple(image_shape), device, dtype)
        if key not in self._cache:
            pattern = load_image(self.image, image_shape).to(device=device, dtype=dtype)
            weight: Tensor | float
            if self.mask_file is None:
                weight = float(self.alpha)  # type: ignore[arg-type]  # __init__ ensured one of the two
            else:
                mask_shape = (1, *image_shape[1:])
                weight = load_image(self.mask_file, mask_shape, mode="nearest").to(device=device, dtype=dtype)
            self._cache[key] = (pattern, weight)
        return self._cache[key]

    def mask(self, image_shape: tuple[int, int, int]) -> Tensor | None:
        """The mask ``(1, H, W)`` in [0, 1] when a mask file is given; ``None`` for an alpha blend (global)."""
        if self.mask_file is None:
            return None
        return self._parts(image_shape, torch.device("cpu"), torch.float32)[1].clone()  # type: ignore[union-attr]

    def apply(self, images: Tensor) -> Tensor:
        """Paste the pattern into ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1]."""
        pattern, weight = self._parts(tuple(images.shape[-3:]), images.device, images.dtype)
        return (images * (1 - weight) + pattern * weight).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"CustomTrigger(image={self.image!r}, mask={self.mask_file!r}, alpha={self.alpha!r}, seed={self.seed!r})"
