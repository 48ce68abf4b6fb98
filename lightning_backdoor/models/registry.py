"""The model registry: builders by name, plus any torchvision classifier as ``torchvision:<name>``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

#: Builders by name; each is called as ``builder(num_classes=..., in_channels=..., **kwargs)``.
MODELS: dict[str, Callable[..., nn.Module]] = {}

TORCHVISION_PREFIX = "torchvision:"

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[BuilderT], BuilderT]:
    """Register a model class or builder under ``name``; returns it unchanged so it works as a decorator."""
    if name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"model name {name!r} clashes with the reserved prefix {TORCHVISION_PREFIX!r}")

    def decorate(builder: BuilderT) -> BuilderT:
        if name in MODELS and MODELS[name] is not builder:
            raise ValueError(f"model {name!r} is already registered to {MODELS[name]!r}")
        MODELS[name] = builder
        return builder

    return decorate


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first ``nn.Conv2d`` of ``model`` for a fresh one reading ``in_channels`` channels; same other settings.

    The replacement is newly initialised: there are no pretrained weights to carry over to a different channel count.
    Returns ``model`` (edited in place).
    """
    # named_modules() walks in registration (pre-)order, so the first Conv2d met is the stem for ordinary models.
    for qualified_name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.in_channels == in_channels:
            return model
        if module.groups != 1:
            raise ValueError(f"first conv of {type(model).__name__} is grouped; cannot change its in_channels")
        parent_name, _, child_name = qualified_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        replacement = nn.Conv2d(
            in_channels,
            module.out_channels,
            kernel_size=module.kernel_size,  # type: ignore[arg-type]
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
        setattr(parent, child_name, replacement)
        return model
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d; cannot adapt it to {in_channels} input channels")


def _known_models_text() -> str:
    return ", ".join(sorted(MODELS)) + f", or {TORCHVISION_PREFIX}<name> (e.g. {TORCHVISION_PREFIX}resnet50)"


def _build_torchvision(name: str, num_classes: int, in_channels: int, **kwargs: object) -> nn.Module:
    # Imported here so that importing the registry stays cheap.
    import torchvision

    # Only classification builders take num_classes and return logits; detection/segmentation ones do not.
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    # weights=None always: the project trains from scratch and the machine may be offline.
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` (or ``torchvision:<name>``) for ``in_channels`` and ``num_classes``.

    The model takes float images ``(N, in_channels, H, W)`` in [0, 1] and returns logits ``(N, num_classes)``.
    Extra ``kwargs`` go to the builder (e.g. ``widths`` for ``compact``, ``width`` for ``preact_resnet18``).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes, in_channels, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {_known_models_text()}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


__all__ = ["MODELS", "build_model", "register_model", "replace_first_conv"]
