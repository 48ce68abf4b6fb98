"""BppAttack: colour-depth squeezing with Floyd–Steinberg dithering as the trigger (Wang, Zhai & Ma, CVPR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger


def quantise(images: Tensor, bits: int) -> Tensor:
    """Round values in [0, 1] to the nearest of the ``2**bits`` levels ``k / (2**bits - 1)``, clamped to [0, 1]."""
    levels = 2**bits - 1
    return torch.round(images * levels).div(levels).clamp(0.0, 1.0)


def floyd_steinberg(images: Tensor, bits: int) -> Tensor:
    """Quantise ``images`` (..., H, W) in [0, 1] to ``2**bits`` levels with Floyd–Steinberg error diffusion.

    Every channel of every image is dithered on its own, in raster order (left to right, top to bottom, no
    serpentine): a pixel's quantisation error goes 7/16 to its right neighbour and 3/16, 5/16, 1/16 to the
    lower-left, lower and lower-right ones; error falling off the image is dropped. The loop runs over the H x W
    positions, each step a vector operation over all images and channels at once, so its cost hardly grows with
    the batch; the error sent to the next row is added once per row.
    """
    height, width = images.shape[-2:]
    # (H, W, M): each position's M = N * C values lie contiguous, the layout the inner loop reads and writes.
    work = images.reshape(-1, height, width).permute(1, 2, 0).contiguous()
    quantised = torch.empty_like(work)
    from_above = torch.zeros_like(work[0])  # (W, M): error diffused into the current row by the row above
    for row in range(height):
        values = work[row] + from_above
        errors = torch.empty_like(values)
        carry = torch.zeros_like(values[0])
        for col in range(width):
            value = values[col] + carry
            level = quantise(value, bits)
            quantised[row, col] = level
            errors[col] = value - level
            carry = errors[col] * (7 / 16)
        # The next row's pixel k receives 3/16 of e[k + 1], 5/16 of e[k] and 1/16 of e[k - 1].
        from_above = errors * (5 / 16)
        from_above[:-1] += errors[1:] * (3 / 16)
        from_above[1:] += errors[:-1] * (1 / 16)
    return quantised.permute(2, 0, 1).reshape(images.shape)


@TRIGGERS.register("bpp")
class BppAttack(Trigger):
    """Squeeze every channel to ``bits`` bits (``2**bits`` levels ``k / (2**bits - 1)``), with Floyd–Steinberg
    dithering so the squeezed image keeps its local mean colour and looks natural.

    From "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via Image Quantization and
    Contrastive Adversarial Learning" (Wang, Zhai & Ma, CVPR 2022). The trigger is the image transformation itself,
    the same for every image: nothing is random, so there is no seed to draw. Only the pixel-space trigger is here;
    the paper's contrastive adversarial training (adversarially perturbed negative samples) is a training
    procedure, not part of it. Images ``(N, C, H, W)`` or ``(C, H, W)``, floats in [0, 1]; the output takes at
    most ``2**bits`` values per channel (before the data module's rounding to 8 bits, which keeps them distinct).

    Args:
        bits: bits per channel after squeezing, 1 to 8 (5 = 32 levels, the setting used here for CIFAR-10).
        dither: diffuse the quantisation error (Floyd–Steinberg), as the paper does; ``False`` rounds each pixel.
        seed: unused (the transformation is fixed); kept so every trigger takes the same arguments.
    """

    def __init__(self, bits: int = 5, dither: bool = True, seed: int = 0) -> None:
        super().__init__(seed)
        if not 1 <= bits <= 8:
            raise ValueError(f"bpp bits must be in 1..8 (levels per channel: 2**bits); got {bits}")
        self.bits = bits
        self.dither = dither

    def apply(self, images: Tensor) -> Tensor:
        """Squeeze ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1] to ``2**bits`` levels per channel."""
        # At least float32 inside: half-precision error sums would drift across a row.
        work = images.to(torch.promote_types(images.dtype, torch.float32))
        squeezed = floyd_steinberg(work, self.bits) if self.dither else quantise(work, self.bits)
        return squeezed.to(images.dtype)
