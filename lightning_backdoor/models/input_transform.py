"""The model's input transform: what a network trained elsewhere expects, applied to pixels inside the network.

Triggers, unseen and test images all live in pixel space: floats in [0, 1], ``(N, C, H, W)``. A network trained on
normalised (or resized) inputs must see them normalised whoever calls it: training, evaluation, a defense's
activation hooks, trigger inversion, a baseline's ``copy.deepcopy``. So the transform is a forward *pre-hook* of the
network itself, never a wrapper module: every call of the bare network applies it, and its ``state_dict`` keeps
exactly the network's keys (weight files keep their layout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True, init=False)
class InputTransform:
    """Per-channel normalisation ``(x - mean) / std`` of [0, 1] pixels, after an optional resize to ``size`` px.

    A small picklable callable (a forward pre-hook), so ``copy.deepcopy``, pickling for DDP spawn and
    ``torch.compile`` keep it with the network.

    Args:
        mean: per-channel means in pixel units ([0, 1]); one value (all channels) or one per channel.
        std: per-channel standard deviations in pixel units, > 0; as many values as ``mean``.
        size: side in pixels of the square input the network was trained on; inputs of another height or width are
            resized bilinearly with antialiasing before normalising. ``None``: never resize.
        channels: the channel count the network reads, to check ``mean`` and ``std`` against (not stored).

    Raises:
        ValueError: (one line) lengths differ or match neither 1 nor ``channels``, a value is not finite, a std is
            not positive, a mean lies outside [0, 1] (0-255 units?), or ``size`` is not a positive integer.
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    size: int | None = None

    def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), size: int | None = None,
                 channels: int | None = None) -> None:
        mean, std = _floats("mean", mean), _floats("std", std)
        if len(mean) != len(std):
            raise ValueError(f"normalize.mean has {len(mean)} values but normalize.std has {len(std)}")
        if channels is not None:
            for name, values in (("mean", mean), ("std", std)):
                if len(values) not in (1, channels):
                    raise ValueError(f"normalize.{name} has {len(values)} values but the model reads {channels} "
                                     f"channel{'s' if channels != 1 else ''}")
        if any(value <= 0 for value in std):
            raise ValueError(f"normalize.std must be positive, got {list(std)}")
        if any(not 0 <= value <= 1 for value in mean):
            raise ValueError(f"normalize.mean is in pixel units [0, 1], got {list(mean)} (0-255 units? divide by 255)")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"input_size must be a positive number of pixels, got {size!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "size", size)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The forward pre-hook: replace the first positional input (pixels) by the transformed images."""
        if not args:
            raise ValueError(f"{type(module).__name__} has an input transform and must get its images positionally")
        return (self.apply(args[0]), *args[1:])

    def apply(self, images: Tensor) -> Tensor:
        """Pixels ``(N, C, H, W)`` in [0, 1] -> what the network was trained on, ``(N, C, size, size)`` or
        ``(N, C, H, W)``; same dtype and device."""
        if not images.is_floating_point():
            raise ValueError(f"the input transform takes float pixels in [0, 1], got {images.dtype}")
        if self.size is not None and tuple(images.shape[-2:]) != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        shape = (-1, 1, 1)  # per channel, broadcast over H and W
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images - mean) / std

    def attach(self, net: nn.Module) -> RemovableHandle:
        """Register this transform as ``net``'s forward pre-hook; ``handle.remove()`` detaches it.

        Raises:
            ValueError: ``net`` already has an input transform (applying two would normalise twice).
        """
        if input_transform_of(net) is not None:
            raise ValueError(f"{type(net).__name__} already has an input transform: {input_transform_of(net)}")
        return net.register_forward_pre_hook(self)

    def as_dict(self) -> dict[str, Any]:
        """``{"mean": [...], "std": [...], "size": int | None}`` for reports and configs."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def _floats(name: str, values: Sequence[float]) -> tuple[float, ...]:
    """``values`` as a non-empty tuple of finite floats, or a one-line ``ValueError`` naming ``normalize.<name>``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"normalize.{name} must be a non-empty list of numbers, got {values!r}")
    try:
        floats = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise ValueError(f"normalize.{name} must be a list of numbers, got {list(values)!r}") from None
    if not all(math.isfinite(value) for value in floats):
        raise ValueError(f"normalize.{name} must hold finite numbers, got {list(floats)}")
    return floats


def input_transform_of(net: nn.Module) -> InputTransform | None:
    """The input transform attached to ``net`` (or to the network inside a ``torch.compile``/DataParallel/DDP
    wrapper, or a PoisonedClassifier's ``net``), or ``None`` when the network reads pixels as they are."""
    for candidate in (net, *(getattr(net, name, None) for name in ("_orig_mod", "module", "net"))):
        if isinstance(candidate, nn.Module):
            for hook in candidate._forward_pre_hooks.values():
                if isinstance(hook, InputTransform):
                    return hook
    return None


__all__ = ["InputTransform", "input_transform_of"]
