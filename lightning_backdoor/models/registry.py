"""The model registry: builders by name, plus any torchvision or timm classifier (``torchvision:<name>``,
``timm:<name>``) and any ``nn.Module`` class by its import path (``package.module.Class``).

A model registers with ``@MODELS.register("<name>")`` above its class or builder function."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from lightning_backdoor.registry import Registry

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
RESERVED_PREFIXES = (TORCHVISION_PREFIX, TIMM_PREFIX)

#: A model class or builder, called as ``builder(num_classes=..., in_channels=..., **kwargs)``.
ModelBuilder = Callable[..., nn.Module]
BuilderT = TypeVar("BuilderT", bound=ModelBuilder)


class ModelRegistry(Registry[ModelBuilder]):
    """The registry of model builders: names never take the forms :func:`build_model` reads otherwise (a reserved
    prefix, a dotted class path), and its unknown-name message lists those forms too."""

    def register(self, name: str) -> Callable[[BuilderT], BuilderT]:
        """As :meth:`Registry.register`; also refuses a name with a reserved prefix or a ``.``."""
        if name.startswith(RESERVED_PREFIXES):
            raise ValueError(f"model name {name!r} clashes with a reserved prefix ({', '.join(RESERVED_PREFIXES)})")
        if "." in name:
            raise ValueError(f"model name {name!r} contains '.', which marks a class path (package.module.Class)")
        return super().register(name)

    def known_names(self) -> str:
        return (super().known_names() + f", or {TORCHVISION_PREFIX}<name> (e.g. {TORCHVISION_PREFIX}resnet50), "
                f"{TIMM_PREFIX}<name> (e.g. {TIMM_PREFIX}resnet18), or an nn.Module class path (package.module.Class)")


#: Model classes and builders by name.
MODELS = ModelRegistry("model")


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


def set_stem_stride(model: nn.Module, stride: int) -> nn.Module:
    """Set the stride of the first ``nn.Conv2d`` of ``model`` (its stem) to ``stride``, as CIFAR ports of ImageNet
    networks do for 32x32 inputs (e.g. MobileNetV3's 3x3/2 stem at stride 1). No weight changes shape, so weights
    trained with the adapted stem load into it. Returns ``model`` (edited in place).

    Raises:
        ValueError: ``stride`` below 1, or a model without an ``nn.Conv2d``.
    """
    if stride < 1:
        raise ValueError(f"stem_stride must be at least 1, got {stride}")
    stem = next((module for module in model.modules() if isinstance(module, nn.Conv2d)), None)
    if stem is None:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d; it has no stem stride to set")
    stem.stride = (stride, stride)
    return model


def _build_torchvision(name: str, num_classes: int, in_channels: int, stem_stride: int | None = None,
                       **kwargs: object) -> nn.Module:
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
    if stem_stride is not None:
        set_stem_stride(model, stem_stride)
    return model


def _build_timm(name: str, num_classes: int, in_channels: int, stem_stride: int | None = None,
                **kwargs: object) -> nn.Module:
    # Imported here: timm is large and most runs use the registry's own models.
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"unknown timm model {name!r}; " + (f"close matches: {', '.join(close)}" if close else
                                                              "see timm.list_models()"))
    if kwargs.get("pretrained"):
        raise ValueError(f"timm model {name!r}: pretrained weights are never downloaded; load them with "
                         f"`defend --checkpoint` instead")
    kwargs.pop("pretrained", None)
    try:  # in_chans: timm adapts the stem itself
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as error:  # a model_kwargs key the architecture does not take
        raise ValueError(f"timm model {name!r} refused model_kwargs {sorted(kwargs)}: {error}") from None
    return model if stem_stride is None else set_stem_stride(model, stem_stride)


def check_model_name(name: str) -> None:
    """What :func:`build_model` checks of ``name`` without building anything: a registered name exists, a class
    path imports and names an ``nn.Module`` subclass (``torchvision:``/``timm:`` names are checked when built). Cheap:
    a command line calls it before it decodes any data.

    Raises:
        ValueError: (one line) as :func:`build_model` would for these.
    """
    if name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        return
    if name not in MODELS and "." in name.strip("."):
        _model_class(name)
    else:
        MODELS.lookup(name)


def _model_class(path: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass at ``package.module.Class``.

    Raises:
        ValueError: (one line) it does not import, or is no ``nn.Module`` subclass.
    """
    module_name, _, class_name = path.rpartition(".")
    try:
        model_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, ValueError) as error:  # ValueError: an empty module name, e.g. '.Class'
        raise ValueError(f"cannot import model class {path!r}: {error}") from None
    except AttributeError:
        raise ValueError(f"cannot import model class {path!r}: module {module_name!r} has no {class_name!r}") from None
    if not (inspect.isclass(model_class) and issubclass(model_class, nn.Module)):
        raise ValueError(f"model class {path!r} is not an nn.Module subclass ({type(model_class).__name__})")
    return model_class


def _build_class_path(path: str, num_classes: int, in_channels: int, **kwargs: object) -> nn.Module:
    """``package.module.Class(**kwargs)``, with ``num_classes``/``in_channels`` if its ``__init__`` names them."""
    model_class = _model_class(path)
    signature = inspect.signature(model_class)
    linked = {key: value for key, value in (("num_classes", num_classes), ("in_channels", in_channels))
              if key in signature.parameters and signature.parameters[key].kind is not inspect.Parameter.VAR_KEYWORD}
    try:
        signature.bind(**linked, **kwargs)
    except TypeError as error:
        raise ValueError(f"model class {path!r} does not take model_kwargs {sorted(kwargs)}: {error}") from None
    return model_class(**linked, **kwargs)


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: object) -> nn.Module:
    """Build the model ``name`` for ``in_channels`` and ``num_classes``.

    ``name`` is a registered name (``MODELS``), ``torchvision:<name>``, ``timm:<name>`` (built with
    ``pretrained=False``: weights are never downloaded) or the import path of an ``nn.Module`` subclass
    (``package.module.Class``; it gets ``num_classes`` and ``in_channels`` only if its ``__init__`` names them).
    The model takes float images ``(N, in_channels, H, W)`` and returns logits ``(N, num_classes)``; a model trained
    on normalised inputs gets its normalisation from :class:`~lightning_backdoor.models.input_transform.InputTransform`.
    Extra ``kwargs`` go to the builder (e.g. ``widths`` for ``compact``, ``width`` for ``preact_resnet18``,
    ``img_size`` for a timm ViT); a torchvision or timm model also takes ``stem_stride`` (:func:`set_stem_stride`).

    Raises:
        ValueError: (one line) an unknown name (with close and known ones, or close timm matches), a class path that
            does not import or is not an ``nn.Module``, or ``kwargs`` the builder does not take.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes, in_channels, **kwargs)
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name[len(TIMM_PREFIX) :], num_classes, in_channels, **kwargs)
    if name not in MODELS and "." in name.strip("."):
        return _build_class_path(name, num_classes, in_channels, **kwargs)
    return MODELS.build(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


__all__ = ["MODELS", "TIMM_PREFIX", "TORCHVISION_PREFIX", "ModelRegistry", "build_model", "check_model_name",
           "replace_first_conv", "set_stem_stride"]
