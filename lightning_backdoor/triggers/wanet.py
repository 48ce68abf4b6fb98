"""WaNet: an imperceptible smooth warp of the image (Nguyen & Tran, ICLR 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger


def identity_grid(height: int, width: int) -> Tensor:
    """The sampling grid ``(1, H, W, 2)`` that leaves an image unchanged (last axis: x, y in [-1, 1])."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((cols, rows), dim=-1)[None]


def warp(images: Tensor, grid: Tensor) -> Tensor:
    """Sample ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) at ``grid`` ``(1 or N, H, W, 2)``, in [0, 1]."""
    batch = images if images.dim() == 4 else images[None]
    warped = F.grid_sample(batch, grid.expand(batch.shape[0], -1, -1, -1), align_corners=True)
    return warped.reshape(images.shape).clamp(0.0, 1.0)


@TRIGGERS.register("wanet")
class WaNet(Trigger):
    """Warp images by a fixed smooth random field, as in the WaNet paper and its reference code.

    A ``(k, k, 2)`` field uniform in [-1, 1], normalised by its mean absolute value, is upsampled bicubically to
    ``(H, W)``; the sampling grid is ``(identity + s * field / size) * grid_rescale`` clamped to [-1, 1].

    Args:
        k: side of the control grid of the random field; smaller is smoother.
        s: strength of the warp.
        grid_rescale: scale of the whole sampling grid (1.0 as in the paper).
        cross_ratio: noise-mode samples per poisoned sample; they get a randomly perturbed warp and keep their
            true labels, so the model learns the exact warp rather than any warp.
        seed: seed of the warping field.
    """

    def __init__(
        self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, cross_ratio: float = 2.0, seed: int = 0
    ) -> None:
        super().__init__(seed)
        if k < 1:
            raise ValueError(f"wanet k must be >= 1; got {k}")
        if s < 0:
            raise ValueError(f"wanet s must be >= 0; got {s}")
        if grid_rescale <= 0:
            raise ValueError(f"wanet grid_rescale must be > 0; got {grid_rescale}")
        if cross_ratio < 0:
            raise ValueError(f"wanet cross_ratio must be >= 0; got {cross_ratio}")
        self.k = k
        self.s = s
        self.grid_rescale = grid_rescale
        self.cross_ratio = cross_ratio
        # The field does not depend on the image size, so one draw serves every resolution.
        field = torch.rand(1, 2, k, k, generator=self.generator()) * 2 - 1
        self._field = field / field.abs().mean()
        self._grids: dict[tuple, Tensor] = {}

    def grid(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The sampling grid ``(1, H, W, 2)`` in [-1, 1] (last axis: x, y), built once per size, device and dtype."""
        key = (height, width, device, dtype)
        if key not in self._grids:
            field = F.interpolate(self._field, size=(height, width), mode="bicubic", align_corners=True)
            field = field.permute(0, 2, 3, 1)  # (1, H, W, 2), the layout grid_sample reads
            # The paper divides by the image side; per axis it is the same on square images.
            scale = torch.tensor([width, height], dtype=field.dtype)
            grid = ((identity_grid(height, width) + self.s * field / scale) * self.grid_rescale).clamp(-1, 1)
            self._grids[key] = grid.to(device=device, dtype=dtype)
        return self._grids[key]

    def apply(self, images: Tensor) -> Tensor:
        """Warp ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1] by the fixed field."""
        height, width = images.shape[-2:]
        return warp(images, self.grid(height, width, images.device, images.dtype))

    def apply_noise(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Warp each image by the fixed field plus its own random jitter, uniform in [-1, 1] / size (the noise mode).

        ``generator`` is a CPU generator; the jitter is drawn there so runs repeat on any device.
        """
        height, width = images.shape[-2:]
        count = images.shape[0] if images.dim() == 4 else 1
        jitter = torch.rand(count, height, width, 2, generator=generator) * 2 - 1
        jitter = (jitter / torch.tensor([width, height])).to(device=images.device, dtype=images.dtype)
        grid = (self.grid(height, width, images.device, images.dtype) + jitter).clamp(-1, 1)
        return warp(images, grid)
