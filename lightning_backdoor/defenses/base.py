"""The defense interface and registry: a defense rewrites a model given unseen clean data and backdoor knowledge."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_backdoor.triggers import Trigger

DEFENSES: dict[str, type[Defense]] = {}


@dataclass
class UnseenData:
    """The defender's clean data: images (N, C, H, W) float in [0, 1] and labels (N,)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise ValueError("the defense got no unseen clean images; use unseen_per_class >= 1")
        if len(self.images) != len(self.labels):
            raise ValueError(f"unseen data has {len(self.images)} images but {len(self.labels)} labels")


class Defense(ABC):
    """Base class: subclasses set ``name`` (registering themselves) and implement :meth:`defend`."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            DEFENSES[cls.name] = cls

    @abstractmethod
    def defend(self, model: nn.Module, unseen: UnseenData, trigger: Trigger | None,
               target_class: int | None) -> dict[str, Any]:
        """Defend ``model`` in place and return what was done (JSON-able values, plus tensors under keys that the
        report drops); ``trigger``/``target_class`` are None when unknown. Must include ``layer`` when the
        defense edits a single layer, and ``seconds``."""


def build_defense(name: str, **kwargs: Any) -> Defense:
    """Instantiate a registered defense by name."""
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known defenses: {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name](**kwargs)
