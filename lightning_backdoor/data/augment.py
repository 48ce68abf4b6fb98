"""Batched training augmentation on any device: random crop with reflect padding, and horizontal flip."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F


def random_crop(images: Tensor, padding: int, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Shift each image of (N, C, H, W) by up to ``padding`` pixels, filling the border by reflection.

    ``shard = (r, w)``: the batch is slice ``r`` of a global batch of ``w × N`` (one DDP rank's part); the random
    draws are made for the whole global batch and this slice's are used, as one process would use them.
    """
    if padding == 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    device = images.device
    dy = _sharded(torch.randint, n, shard, 0, 2 * padding + 1, device=device)
    dx = _sharded(torch.randint, n, shard, 0, 2 * padding + 1, device=device)
    rows = (dy + torch.arange(h, device=device).view(1, 1, h, 1)).expand(n, c, h, w + 2 * padding)
    cols = (dx + torch.arange(w, device=device).view(1, 1, 1, w)).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(images: Tensor, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Mirror a random half of the batch left-right (``shard`` as in :func:`random_crop`)."""
    flip = _sharded(torch.rand, images.shape[0], shard, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def shift_and_flip(images: Tensor) -> Tensor:
    """The defenses' augmentation of unseen images: a shift by up to 1/8 of the side, and a flip for RGB."""
    images = random_crop(images, max(1, images.shape[-1] // 8))
    return random_flip(images) if images.shape[1] == 3 else images


def _sharded(draw: Callable[..., Tensor], n: int, shard: tuple[int, int], *args: int, device: torch.device) -> Tensor:
    """``draw(*args, (w × n, 1, 1, 1))`` and the ``r``-th block of ``n`` rows of it, for ``shard = (r, w)``. Drawn
    from the CPU's generator whatever ``device`` (then moved there): a seed gives the same views on every device."""
    index, count = shard
    return draw(*args, (count * n, 1, 1, 1))[index * n:(index + 1) * n].to(device)
