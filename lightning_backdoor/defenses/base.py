"""The typed defense core: a defense rewrites a model in place, given unseen clean data and what is known about the
backdoor, and returns a :class:`DefenseResult`.

Evaluating before and after (:func:`lightning_backdoor.defenses.report.run_defense`), writing files and logging
are separate consumers of that result; a defense does no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_backdoor.registry import Registry
from lightning_backdoor.triggers import Trigger

DEFENSES: Registry[type[Defense]] = Registry("defense")


def check_seed(seed: object, note: str = "") -> None:
    """Raise a one-line ``ValueError`` unless ``seed`` is an integer in [0, 2**63), the seeds the defenses take (a
    bool, float or negative seed would fail inside ``torch.Generator.manual_seed`` after work, or alias another);
    ``note`` is appended to the message."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**63){note}")


@dataclass(frozen=True)
class UnseenData:
    """The defender's clean data: images (N, C, H, W) float pixels in [0, 1] and labels (N,) int64.

    Raises:
        ValueError: no images, or as many labels as images.
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise ValueError("the defense got no unseen clean images; give a folder of your own (defend --unseen_root "
                             "DIR) or draw them from the data (data.init_args.unseen_per_class >= 1)")
        if len(self.images) != len(self.labels):
            raise ValueError(f"unseen data has {len(self.images)} images but {len(self.labels)} labels")


@dataclass(frozen=True)
class BackdoorKnowledge:
    """What the defender knows about an all-to-one backdoor: its trigger(s), acting on pixels in [0, 1], and the
    target class. Several triggers are candidates of one backdoor (e.g. estimated ones), defended together.

    Raises:
        ValueError: no trigger, or a negative target class.
    """

    triggers: tuple[Trigger, ...]
    target_class: int

    def __post_init__(self) -> None:
        if not self.triggers:
            raise ValueError("backdoor knowledge needs at least one trigger")
        if self.target_class < 0:
            raise ValueError(f"target_class={self.target_class} must be a class index >= 0")

    @classmethod
    def of(cls, trigger: Trigger | Sequence[Trigger], target_class: int) -> BackdoorKnowledge:
        """From one trigger or a sequence of them."""
        return cls((trigger,) if isinstance(trigger, Trigger) else tuple(trigger), int(target_class))

    @property
    def trigger(self) -> Trigger:
        """The first (main) trigger."""
        return self.triggers[0]


@dataclass
class DefenseResult:
    """What a defense did.

    Attributes:
        method: what ran, e.g. ``editing/closed_form``, ``ft``, ``editing/no_backdoor_found``.
        seconds: wall-clock seconds of the whole defense.
        layer: the one layer it edited (qualified name in the model), if it edits one.
        stages: the model's weights at intermediate stages, by stage name (``after_edit``: before the repair), each
            a partial state dict (qualified names -> tensors) to load over the defended model to evaluate that stage.
        repaired: whether a repair step changed the result.
        details: JSON-able facts (selection scores, diagnostics, estimation summary, ...).
        estimated: the trigger and target the defense estimated itself, when it was not told them.
        picture: an image (C, H, W) in [0, 1] of the estimated trigger, when there is one to show.
    """

    method: str
    seconds: float
    layer: str | None = None
    stages: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    repaired: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    estimated: BackdoorKnowledge | None = None
    picture: Tensor | None = None


class Defense(ABC):
    """A defense that removes a backdoor from a model in place, chosen by its class name (``--defense
    ActivationEditing``, ``--defense FineTuning``, ...); a subclass of your own is registered with
    ``@DEFENSES.register("<name>")``.

    ``requires_knowledge``: the defense needs a :class:`BackdoorKnowledge` (refuses ``None``). To run it without,
    compose it with an estimator: :class:`~lightning_backdoor.defenses.estimate_first.EstimateFirst`.
    """

    name: ClassVar[str] = ""
    requires_knowledge: ClassVar[bool] = False

    @abstractmethod
    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        """Defend ``model`` in place (it may be in train or eval mode; leave it in the mode it came in) and return
        what was done.

        Raises:
            ValueError: (one line) the defense cannot run on this model or data, or ``knowledge`` is ``None`` for a
                defense that ``requires_knowledge``.
        """

    def check_model(self, model: nn.Module, images: Tensor) -> None:
        """Refuse in one line what the defense cannot do on ``model`` before any work: called with a few unseen
        images (N, C, H, W) before training (by the ``DefenseCallback``) and before a trigger estimation. Nothing by
        default; ``model`` is left as it came (mode and weights).

        Raises:
            ValueError: (one line) the defense cannot run on this model.
        """

    def check_settings(self, **conditions: bool) -> None:
        """One-line ``ValueError`` naming the first setting whose condition is false, e.g.
        ``self.check_settings(epochs=epochs >= 1)``; called by constructors before anything runs."""
        for setting, holds in conditions.items():
            if not holds:
                raise ValueError(f"{defense_name(self)}: {setting}={getattr(self, setting, '?')!r} is "
                                 f"out of range")

    def require(self, knowledge: BackdoorKnowledge | None) -> BackdoorKnowledge:
        """``knowledge``, or a one-line ``ValueError`` when it is ``None``."""
        if knowledge is None:
            raise ValueError(f"the {defense_name(self)} defense needs the trigger and target class; "
                             f"without them, compose it with a trigger estimator (EstimateFirst, or "
                             f"trigger_known=false)")
        return knowledge


def defense_name(defense: Defense) -> str:
    """A defense's name in messages and bench rows: its registered name (``editing``, ``ft``...), else its class
    name."""
    return defense.name or type(defense).__name__


def build_defense(name: str, **kwargs: Any) -> Defense:
    """Instantiate a registered defense by name, e.g. ``build_defense("ft", epochs=10)``.

    Raises:
        ValueError: (one line) an unknown name.
    """
    return DEFENSES.build(name, **kwargs)
