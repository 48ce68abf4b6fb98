"""BadNets: a small solid square patch stamped at a fixed place (Gu et al., 2017)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger

Corner = Literal["bottom_right", "top_left", "top_right", "bottom_left", "center"]
_CORNERS = ("bottom_right", "top_left", "top_right", "bottom_left", "center")


@TRIGGERS.register("badnets")
class BadNets(Trigger):
    """A ``size`` x ``size`` patch of constant ``value`` on every channel.

    Args:
        size: side of the square patch, in pixels.
        position: a named place, or the ``(row, col)`` of the patch's top-left pixel.
        value: the patch's intensity in [0, 1] (1.0 is white).
        margin: distance in pixels between the patch and the image border, for a named corner.
        seed: unused (the patch is fixed); kept so every trigger takes the same arguments.
    """

    def __init__(
        self,
        size: int = 3,
        position: Corner | tuple[int, int] = "bottom_right",
        value: float = 1.0,
        margin: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if size < 1:
            raise ValueError(f"trigger size must be >= 1; got {size}")
        if margin < 0:
            raise ValueError(f"trigger margin must be >= 0; got {margin}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"trigger value must be in [0, 1]; got {value}")
        if isinstance(position, str):
            if position not in _CORNERS:
                raise ValueError(f"unknown trigger position {position!r}; use one of {', '.join(_CORNERS)}")
        else:
            # YAML and the CLI hand over lists; a tuple keeps the repr and the comparison plain.
            position = (int(position[0]), int(position[1]))
        self.size = size
        self.position = position
        self.value = value
        self.margin = margin

    def origin(self, height: int, width: int) -> tuple[int, int]:
        """The ``(row, col)`` of the patch's top-left pixel on a ``height`` x ``width`` image."""
        if not isinstance(self.position, str):
            return self.position
        far_row, far_col = height - self.size - self.margin, width - self.size - self.margin
        return {
            "bottom_right": (far_row, far_col),
            "top_left": (self.margin, self.margin),
            "top_right": (self.margin, far_col),
            "bottom_left": (far_row, self.margin),
            "center": ((height - self.size) // 2, (width - self.size) // 2),
        }[self.position]

    def check(self, image_shape: tuple[int, int, int]) -> None:
        _, height, width = image_shape
        image = f"{height}x{width} image"
        if self.size > min(height, width):
            raise ValueError(f"trigger size {self.size} is larger than the {image}; use size <= {min(height, width)}")
        if isinstance(self.position, str):
            if self.size + self.margin > min(height, width):
                raise ValueError(
                    f"trigger size {self.size} with margin {self.margin} does not fit the {image}; "
                    f"use size + margin <= {min(height, width)}"
                )
            return
        row, col = self.position
        if not (0 <= row <= height - self.size and 0 <= col <= width - self.size):
            raise ValueError(
                f"trigger of size {self.size} at (row, col) = ({row}, {col}) does not fit the {image}; "
                f"use 0 <= row <= {height - self.size} and 0 <= col <= {width - self.size}"
            )

    def mask(self, image_shape: tuple[int, int, int]) -> Tensor:
        """Ones on the patch, zeros elsewhere: ``(1, H, W)``."""
        self.check(image_shape)
        _, height, width = image_shape
        row, col = self.origin(height, width)
        mask = torch.zeros(1, height, width)
        mask[:, row : row + self.size, col : col + self.size] = 1.0
        return mask

    def apply(self, images: Tensor) -> Tensor:
        """Stamp the patch on ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1]."""
        self.check(tuple(images.shape[-3:]))
        row, col = self.origin(*images.shape[-2:])
        poisoned = images.clone()
        poisoned[..., row : row + self.size, col : col + self.size] = self.value
        return poisoned
