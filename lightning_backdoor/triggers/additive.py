"""Additive: a user's own perturbation added to every image, ``clamp(x + delta)`` (e.g. a universal adversarial
perturbation or a noise trigger computed elsewhere)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lightning_backdoor.triggers.base import TRIGGERS, Trigger
from lightning_backdoor.triggers.blended import check_file


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (numpy and PIL messages may run over several)."""
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def read_delta(path: str) -> Tensor:
    """The raw perturbation in ``path`` as float64 ``(C, H, W)`` with C = 1 or 3, before ``scale``.

    A ``.npy`` file holds it in pixel units, ``(C, H, W)``, ``(H, W, C)`` or ``(H, W)`` (one channel); it is read
    with ``allow_pickle=False``, so a file holding Python objects is refused rather than run. Any other file is a
    *signed image* read by PIL: grey 0.5 is no change, ``delta = (value - 0.5) * 2`` with ``value`` in [0, 1] (an
    8-bit file has no exact 0.5: 128 gives +1/255, 127 gives -1/255). Raises a one-line ``ValueError`` for an
    unreadable file, a shape without a channel axis of 1 or 3, a non-numeric array, or NaN or infinite values.
    """
    check_file(path, "additive trigger delta")
    name = repr(str(path))
    if str(path).lower().endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:  # pickled objects, a broken header, a truncated file
            raise ValueError(f"cannot read additive trigger delta {name} as a plain .npy array: {first_line(error)}"
                             ) from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
            if hasattr(array, "close"):  # an .npz archive under a .npy name
                array.close()
            kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise ValueError(f"additive trigger delta {name} holds {kind}, not numbers; save a float array")
        delta = torch.from_numpy(array.astype(np.float64))
        if delta.dim() == 2:
            delta = delta[None]
        elif delta.dim() == 3 and delta.shape[0] not in (1, 3) and delta.shape[-1] in (1, 3):
            delta = delta.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        if delta.dim() != 3 or delta.shape[0] not in (1, 3) or delta.numel() == 0:
            raise ValueError(f"additive trigger delta {name} has shape {tuple(array.shape)}; use (C, H, W), (H, W, C) "
                             f"or (H, W) with C = 1 or 3")
    else:
        try:
            with Image.open(path) as file:
                if file.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: finer steps than 8-bit
                    picture, top = np.asarray(file, dtype=np.float64)[None], 65535.0
                else:
                    picture = np.asarray(file.convert("L" if file.mode in ("1", "L", "LA") else "RGB"), np.float64)
                    picture, top = (picture[None] if picture.ndim == 2 else picture.transpose(2, 0, 1)), 255.0
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"cannot read additive trigger delta {name} as an image or a .npy file: "
                             f"{first_line(error)}") from None
        delta = (torch.from_numpy(np.ascontiguousarray(picture)) / top - 0.5) * 2
    if not torch.isfinite(delta).all():
        raise ValueError(f"additive trigger delta {name} holds NaN or infinite values")
    return delta.contiguous()


@TRIGGERS.register("additive")
class Additive(Trigger):
    """``x' = clamp(x + delta, 0, 1)`` with a fixed perturbation ``delta`` read from a file.

    ``delta = clip(scale * raw, -epsilon, epsilon)`` where ``raw`` is the file's perturbation (see
    :func:`read_delta`: a ``.npy`` array in pixel units, or a signed image with grey 0.5 as zero). A one-channel
    ``delta`` is added to every channel; otherwise its channels must be the images'. Its height and width must be
    the images' (it is not resized: a resized perturbation is another perturbation); :meth:`check` refuses other
    shapes. Images ``(N, C, H, W)`` or ``(C, H, W)``, floats in [0, 1]; ``delta``, ``scale * raw`` and
    ``epsilon`` in the same intensity units.

    The file is read once, at construction, and refused there in one line if it is missing, unreadable, pickled,
    badly shaped, holds NaN or infinite values, or ``scale * raw`` leaves [-1, 1] (a perturbation in 0-255 units
    needs ``scale: 0.00392156862745098``, i.e. 1/255).

    Args:
        delta: path to the perturbation, a ``.npy`` file or an image file (PNG, 8 or 16 bits).
        scale: factor on the file's perturbation, > 0.
        epsilon: the L-infinity bound ``delta`` is clipped to, in (0, 1]; ``None`` clips nothing.
        seed: unused (the perturbation is fixed); kept so every trigger takes the same arguments.
    """

    def __init__(self, delta: str, scale: float = 1.0, epsilon: float | None = None, seed: int = 0) -> None:
        super().__init__(seed)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"additive trigger scale must be a number > 0; got {scale}")
        if epsilon is not None and not 0.0 < epsilon <= 1.0:
            raise ValueError(f"additive trigger epsilon (an L-infinity bound in [0, 1] units) must be in (0, 1]; got "
                             f"{epsilon}")
        raw = read_delta(os.fspath(delta)) * scale
        if raw.abs().max() > 1.0:
            raise ValueError(f"additive trigger delta {str(delta)!r} times scale {scale} reaches "
                             f"{raw.abs().max().item():.4g}, beyond the [-1, 1] a pixel can move; in 0-255 units use "
                             f"scale = 1/255 = 0.00392156862745098")
        self.delta = os.fspath(delta)
        self.scale = scale
        self.epsilon = epsilon
        self._delta = raw if epsilon is None else raw.clamp(-epsilon, epsilon)
        self._cache: dict[tuple, Tensor] = {}

    def perturbation(self, image_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``delta`` ``(C or 1, H, W)`` for images of ``image_shape``, after ``scale`` and ``epsilon``."""
        self.check(image_shape)
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = self._delta.to(device=device, dtype=dtype)
        return self._cache[key]

    def check(self, image_shape: tuple[int, int, int]) -> None:
        channels, height, width = image_shape
        delta_channels, delta_height, delta_width = self._delta.shape
        if (delta_height, delta_width) != (height, width) or delta_channels not in (1, channels):
            fitting = " or ".join(dict.fromkeys(f"{count}x{height}x{width}" for count in (1, channels)))
            raise ValueError(f"additive trigger delta {self.delta!r} is {delta_channels}x{delta_height}x{delta_width} "
                             f"(C x H x W) but the images are {channels}x{height}x{width}; use a delta of {fitting}")

    def apply(self, images: Tensor) -> Tensor:
        """Add ``delta`` to ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1] and clamp to [0, 1]."""
        return (images + self.perturbation(tuple(images.shape[-3:]), images.device, images.dtype)).clamp(0.0, 1.0)
