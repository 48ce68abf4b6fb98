"""SIG: a horizontal sinusoidal signal added to the image, used as a clean-label trigger (Barni et al., 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger


@TRIGGERS.register("sig")
class SIG(Trigger):
    """Add ``v(i, j) = delta * sin(2 * pi * j * frequency / W)`` to every channel, then clamp to [0, 1].

    Args:
        delta: amplitude of the sinusoid, in intensity units (20/255 as in the paper).
        frequency: number of periods across the image width.
        seed: unused (the signal is fixed); kept so every trigger takes the same arguments.
    """

    def __init__(self, delta: float = 20 / 255, frequency: int = 6, seed: int = 0) -> None:
        super().__init__(seed)
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"sig delta must be in (0, 1]; got {delta}")
        if frequency < 1:
            raise ValueError(f"sig frequency must be >= 1; got {frequency}")
        self.delta = delta
        self.frequency = frequency
        self._signals: dict[tuple, Tensor] = {}

    def signal(self, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The signal along a row, ``(W,)``, built once per width, device and dtype."""
        key = (width, device, dtype)
        if key not in self._signals:
            columns = torch.arange(width, dtype=torch.float64)
            signal = self.delta * torch.sin(2 * math.pi * columns * self.frequency / width)
            self._signals[key] = signal.to(device=device, dtype=dtype)
        return self._signals[key]

    def apply(self, images: Tensor) -> Tensor:
        """Add the signal to ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1]."""
        # Broadcasting over the last axis puts the same row signal on every row and channel.
        return (images + self.signal(images.shape[-1], images.device, images.dtype)).clamp(0.0, 1.0)
