"""Blended: a fixed full-size pattern mixed into the image at a low opacity (Chen et al., 2017)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger


def check_file(path: str, what: str) -> None:
    """Raise a one-line ``ValueError`` if ``path`` is not an existing file (a folder is named as one)."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {str(path)!r} is a folder, not a file; give the file's path")
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative paths are read from the current folder {os.getcwd()})"
        raise ValueError(f"{what} file {str(path)!r} does not exist{where}")


def load_image(path: str, image_shape: tuple[int, int, int], mode: str = "bilinear") -> Tensor:
    """Read an image file as float ``(C, H, W)`` in [0, 1] on the CPU, resized and converted to ``image_shape``.

    ``mode`` is the interpolation used to resize (``"nearest"`` keeps a binary mask binary).
    """
    channels, height, width = image_shape
    try:
        with Image.open(path) as file:
            picture = file.convert("RGB" if channels == 3 else "L")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image file {str(path)!r}: {error}") from None
    image = pil_to_tensor(picture).float().div(255.0)
    if image.shape[0] != channels:
        image = image.expand(channels, -1, -1)  # grey source on an image with neither 1 nor 3 channels
    if image.shape[-2:] != (height, width):
        # Antialiasing keeps a large trigger image from aliasing when shrunk to 28x28 or 32x32.
        antialias = mode in ("bilinear", "bicubic")
        image = F.interpolate(image[None], size=(height, width), mode=mode, antialias=antialias)[0]
    return image.clamp(0.0, 1.0).contiguous()


@TRIGGERS.register("blended")
class Blended(Trigger):
    """``x' = (1 - alpha) * x + alpha * pattern`` with a fixed pattern the size of the image.

    Args:
        alpha: opacity of the pattern, in (0, 1].
        image: path to the pattern image (any format PIL reads), resized to the images; ``None`` draws a seeded
            uniform-noise pattern instead (the field's usual Hello Kitty picture is not shipped).
        seed: seed of the noise pattern.
    """

    def __init__(self, alpha: float = 0.2, image: str | None = None, seed: int = 0) -> None:
        super().__init__(seed)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"blended trigger alpha must be in (0, 1]; got {alpha}")
        if image is not None:
            check_file(image, "blended trigger image")
        self.alpha = alpha
        self.image = image
        self._patterns: dict[tuple, Tensor] = {}

    def pattern(self, image_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The pattern ``(C, H, W)`` in [0, 1], built once per shape, device and dtype."""
        key = (tuple(image_shape), device, dtype)
        if key not in self._patterns:
            if self.image is not None:
                pattern = load_image(self.image, image_shape)
            else:
                # Drawn on the CPU so a seed gives the same pattern on every device.
                pattern = torch.rand(image_shape, generator=self.generator())
            self._patterns[key] = pattern.to(device=device, dtype=dtype)
        return self._patterns[key]

    def apply(self, images: Tensor) -> Tensor:
        """Blend the pattern into ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1]."""
        pattern = self.pattern(tuple(images.shape[-3:]), images.device, images.dtype)
        return torch.lerp(images, pattern.expand_as(images), self.alpha).clamp(0.0, 1.0)
