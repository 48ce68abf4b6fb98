"""The trigger interface and its registry: a trigger is a pure-torch function on image batches in [0, 1]."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import ClassVar, ContextManager

import torch
from torch import Tensor, nn

from lightning_backdoor.registry import Registry

#: Trigger classes by name; a trigger registers with ``@TRIGGERS.register("<name>")`` above its class.
TRIGGERS: Registry[type[Trigger]] = Registry("trigger")


class Trigger(ABC):
    """Base class of every trigger.

    Subclasses implement :meth:`apply` on a float batch ``(N, C, H, W)`` in [0, 1] and return a batch of the same
    shape, dtype and range. A trigger is deterministic: its random parts (patterns, warping fields) are drawn once
    from ``seed`` for a given image shape and cached. A subclass registered with ``@TRIGGERS.register("<name>")``
    gets that name as its ``name``.
    """

    #: The name it is registered (and built) by; empty for triggers that are not chosen by name (estimated ones).
    name: ClassVar[str] = ""
    #: Extra training samples per poisoned one that get the trigger's *noise mode* with their labels kept (WaNet;
    #: Adaptive-Blend's regularisation samples).
    cross_ratio: float = 0.0

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abstractmethod
    def apply(self, images: Tensor) -> Tensor:
        """Return ``images`` (N, C, H, W) in [0, 1] with the trigger applied."""

    def __call__(self, images: Tensor) -> Tensor:
        return self.apply(images)

    def mask(self, image_shape: tuple[int, int, int]) -> Tensor | None:
        """Where the trigger acts, ``(1, H, W)`` in [0, 1]; ``None`` for a global trigger (it touches every pixel)."""
        return None

    def attached(self, model: nn.Module) -> ContextManager[None]:
        """Inside, ``model`` sees the trigger where it acts in the network: a feature-space trigger (estimated at a
        layer) hooks that layer's input; an image-space trigger acts in :meth:`apply` and needs nothing here."""
        return nullcontext()

    def check(self, image_shape: tuple[int, int, int]) -> None:
        """Raise ``ValueError`` with a one-line message if the trigger cannot apply to images of ``(C, H, W)``."""

    def apply_for_training(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The trigger as the poisoned *training* samples carry it; :meth:`apply` is the trigger at test time (the
        test split, evaluation, defenses). The default is :meth:`apply`: one trigger for both. Adaptive-Blend
        overrides it (a random part of its pattern, at a lower opacity). ``generator`` is a CPU generator, seeded by
        the data module, so the random parts repeat for a seed on any device."""
        return self.apply(images)

    def apply_noise(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The noise mode: a randomised variant trained with true labels so the trigger stays specific (WaNet), or
        the trigger on samples that keep their labels (Adaptive-Blend's regularisation samples)."""
        return images

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from this trigger's seed."""
        return torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def build_trigger(name: str, **kwargs: object) -> Trigger:
    """Instantiate a registered trigger by name, e.g. ``build_trigger("badnets", size=3)``.

    Raises:
        ValueError: (one line) an unknown name, with close matches and the known triggers.
    """
    return TRIGGERS.build(name, **kwargs)
