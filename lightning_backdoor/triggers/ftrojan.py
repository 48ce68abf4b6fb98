"""FTrojan: fixed bumps at a mid and a high frequency of the chrominance's block DCT (Wang et al., ECCV 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger

#: RGB -> YUV (BT.601, analogue): Y = 0.299 R + 0.587 G + 0.114 B, U = 0.492 (B - Y), V = 0.877 (R - Y). Rows: Y, U, V.
_LUMA = (0.299, 0.587, 0.114)
RGB_TO_YUV = torch.tensor(
    [
        list(_LUMA),
        [0.492 * (blue - luma) for blue, luma in zip((0, 0, 1), _LUMA)],
        [0.877 * (red - luma) for red, luma in zip((1, 0, 0), _LUMA)],
    ],
    dtype=torch.float64,
)


def dct_matrix(size: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal DCT-II matrix ``(size, size)``: ``D[k, i] = s_k cos(pi (2 i + 1) k / (2 size))`` with
    ``s_0 = sqrt(1 / size)``, ``s_k = sqrt(2 / size)``. ``D @ x`` transforms a signal, ``D.T @ y`` inverts it; the 2-D
    DCT of a block ``X`` (h, w) is ``D_h @ X @ D_w.T`` (the scaling of OpenCV's and SciPy's ``norm="ortho"`` DCT)."""
    frequencies = torch.arange(size, dtype=torch.float64)[:, None]
    positions = torch.arange(size, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * positions + 1) * frequencies / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix.to(dtype)


@TRIGGERS.register("ftrojan")
class FTrojan(Trigger):
    """Add ``magnitude`` to the DCT coefficients at ``positions`` of every block of the U and V channels.

    From "An Invisible Black-box Backdoor Attack through Frequency Domain" (Wang et al., ECCV 2022): RGB images are
    converted to YUV, each ``block`` x ``block`` block of U and V is transformed by the orthonormal 2-D DCT-II, the
    coefficients at ``positions`` (frequency row, column within the block) get ``+magnitude``, the blocks are
    transformed back, the image converted back to RGB and clamped to [0, 1]. Greyscale images get the bumps on their
    one channel. Every step before the clamp is linear, so the trigger is computed once per image shape as the RGB
    pattern those steps add (exactly what the round trip adds, up to float rounding) and applied as
    ``clamp(x + pattern)``.

    Images ``(N, C, H, W)`` or ``(C, H, W)``, floats in [0, 1], with C = 1 or 3; ``magnitude`` is in the same
    units (the paper's 30 on the 0-255 scale is 30/255: with the orthonormal DCT, coefficients scale as pixels).

    Args:
        magnitude: added to each chosen coefficient, in intensity units (default 30/255, the paper's default).
        positions: ``(row, col)`` frequencies within a block; ``None``: a mid and the highest frequency,
            ``(b_h / 2 - 1, b_w / 2 - 1)`` and ``(b_h - 1, b_w - 1)``, i.e. (15, 15) and (31, 31) for 32 x 32 blocks,
            the paper's CIFAR-10 choice.
        block: side of the square DCT blocks in pixels; the image's sides must be multiples of it. ``None`` (the
            default): the whole image is one block, which on 32 x 32 CIFAR-10 images is the paper's block of 32.
        seed: unused (the trigger is fixed); kept so every trigger takes the same arguments.
    """

    def __init__(
        self,
        magnitude: float = 30 / 255,
        positions: Sequence[tuple[int, int]] | None = None,
        block: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if not 0.0 < magnitude <= 1.0 or not math.isfinite(magnitude):
            raise ValueError(f"ftrojan magnitude must be in (0, 1] (intensity units: 30/255 is the paper's 30); got "
                             f"{magnitude}")
        if block is not None and block < 1:
            raise ValueError(f"ftrojan block must be >= 1 (or null for the whole image); got {block}")
        if positions is not None:
            # YAML and the CLI hand over lists; tuples keep the repr and the comparison plain.
            positions = tuple((int(row), int(col)) for row, col in positions)
            if not positions:
                raise ValueError("ftrojan positions is empty; give at least one (row, col) frequency, or null")
            if any(row < 0 or col < 0 for row, col in positions):
                raise ValueError(f"ftrojan positions must be >= 0; got {list(positions)}")
        self.magnitude = magnitude
        self.positions = positions
        self.block = block
        self._patterns: dict[tuple, Tensor] = {}

    def block_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(rows, cols)`` of one DCT block on a ``height`` x ``width`` image."""
        return (height, width) if self.block is None else (self.block, self.block)

    def frequencies(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        """The ``(row, col)`` frequencies bumped in each block of a ``height`` x ``width`` image."""
        if self.positions is not None:
            return self.positions
        rows, cols = self.block_size(height, width)
        mid, high = (max(rows // 2 - 1, 0), max(cols // 2 - 1, 0)), (rows - 1, cols - 1)
        return (mid,) if mid == high else (mid, high)

    def check(self, image_shape: tuple[int, int, int]) -> None:
        channels, height, width = image_shape
        if channels not in (1, 3):
            raise ValueError(f"ftrojan needs greyscale (1 channel) or RGB (3 channels) images; got {channels} channels")
        rows, cols = self.block_size(height, width)
        if height % rows or width % cols:
            raise ValueError(f"ftrojan block {self.block} does not tile the {height}x{width} image; use a block that "
                             f"divides both sides, or block=null for the whole image")
        outside = [(row, col) for row, col in self.frequencies(height, width) if row >= rows or col >= cols]
        if outside:
            raise ValueError(f"ftrojan positions {outside} are outside the {rows}x{cols} DCT block; use rows < {rows} "
                             f"and cols < {cols}")

    def pattern(self, image_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """What the trigger adds before the clamp, ``(C, H, W)`` in intensity units, built once per shape, device
        and dtype."""
        key = (tuple(image_shape), device, dtype)
        if key not in self._patterns:
            self.check(image_shape)
            channels, height, width = image_shape
            rows, cols = self.block_size(height, width)
            bumps = torch.zeros(rows, cols, dtype=torch.float64)
            for row, col in self.frequencies(height, width):
                bumps[row, col] = self.magnitude
            # Inverse orthonormal DCT of the bumps: the change of one block, the same in every block.
            change = dct_matrix(rows).T @ bumps @ dct_matrix(cols)
            change = change.repeat(height // rows, width // cols)
            if channels == 3:
                # The change is in U and V (Y unchanged); back in RGB it is YUV->RGB's U and V columns times it.
                yuv_to_rgb = torch.linalg.inv(RGB_TO_YUV)
                pattern = (yuv_to_rgb[:, 1] + yuv_to_rgb[:, 2])[:, None, None] * change
            else:
                pattern = change[None]
            self._patterns[key] = pattern.to(device=device, dtype=dtype)
        return self._patterns[key]

    def apply(self, images: Tensor) -> Tensor:
        """Add the frequency bumps to ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1] and clamp."""
        return (images + self.pattern(tuple(images.shape[-3:]), images.device, images.dtype)).clamp(0.0, 1.0)
