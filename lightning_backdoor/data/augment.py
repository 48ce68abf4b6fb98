"""Batched training augmentation on any device: random crop with reflect padding, and horizontal flip."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def random_crop(images: Tensor, padding: int) -> Tensor:
    """Shift each image of (N, C, H, W) by up to ``padding`` pixels, filling the border by reflection."""
    if padding == 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    device = images.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=device)
    rows = (dy + torch.arange(h, device=device).view(1, 1, h, 1)).expand(n, c, h, w + 2 * padding)
    cols = (dx + torch.arange(w, device=device).view(1, 1, 1, w)).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(images: Tensor) -> Tensor:
    """Mirror a random half of the batch left-right."""
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def shift_and_flip(images: Tensor) -> Tensor:
    """The defenses' augmentation of unseen images: a shift by up to 1/8 of the side, and a flip for RGB."""
    images = random_crop(images, max(1, images.shape[-1] // 8))
    return random_flip(images) if images.shape[1] == 3 else images
