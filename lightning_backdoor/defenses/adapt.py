"""A user's model as a defense expects it, for the duration of a block: logits out, float32 weights, pixels in.

A defense and its evaluation call the model on float32 pixel images ``(N, C, H, W)`` in [0, 1] and read logits
``(N, K)``, and address layers by their names in the model (``fc``, ``model.layer4.1.conv2``). A LightningModule
written elsewhere may return a tuple or a dict, hold half-precision weights (``precision="bf16-true"``) or have been
trained on normalised images. Nothing here wraps the model (a wrapper would rename every layer): hooks and in-place
dtype changes adapt it and are undone when the block ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_backdoor.models.input_transform import InputTransform, input_transform_of

#: The key under which a model returning a dict holds its logits (as Hugging Face's ``ModelOutput`` does).
LOGITS_KEY = "logits"
#: Images whose values stray further than this outside [0, 1] are not pixels (normalised images reach about ±2).
PIXEL_SLACK = 0.01


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the output itself when a tensor, the first item of a tuple or list, or the
    ``"logits"`` entry of a dict.

    Raises:
        ValueError: (one line) the output is none of these.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get(LOGITS_KEY), Tensor):
        return output[LOGITS_KEY]
    kind = (f"a dict with keys {sorted(map(str, output))[:8]}" if isinstance(output, Mapping) else
            f"a {type(output).__name__} whose first item is not a tensor" if isinstance(output, (tuple, list)) else
            f"a {type(output).__name__}")
    raise ValueError(f"the model returns {kind}; the defense reads logits (N, K): a tensor, a tuple or list with the "
                     f"logits first, or a dict with them under {LOGITS_KEY!r}")


def logits_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor | None:
    """A forward hook that makes a model return :func:`logits_of` its output (nothing to do for a tensor)."""
    return None if isinstance(output, Tensor) else logits_of(output)


@contextmanager
def returning_logits(model: nn.Module) -> Iterator[None]:
    """While inside, ``model(x)`` returns :func:`logits_of` its output (:func:`logits_hook`, removed afterwards)."""
    handle = model.register_forward_hook(logits_hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def computing_in_float32(model: nn.Module) -> Iterator[Callable[[], None]]:
    """While inside, ``model``'s floating parameters and buffers are float32 (the same tensor objects, their
    ``.data`` cast); afterwards each is cast back to its own dtype (float16, bfloat16, float64...).

    Yields a function that rounds the weights to their stored dtypes and back to float32 in place, so that an
    evaluation inside the block sees the weights the model will hold afterwards.
    """
    stored = {name: tensor.dtype for name, tensor in _floating_tensors(model) if tensor.dtype != torch.float32}
    for name, tensor in _floating_tensors(model):
        if name in stored:
            tensor.data = tensor.data.float()

    def round_to_stored() -> None:
        for name, tensor in _floating_tensors(model):
            if name in stored and tensor.dtype == torch.float32:
                tensor.data = tensor.data.to(stored[name]).float()

    try:
        yield round_to_stored
    finally:
        for name, tensor in _floating_tensors(model):
            if name in stored:
                tensor.data = tensor.data.to(stored[name])


def _floating_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of every floating parameter and buffer (parameters first, names as in the state dict)."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point():
            yield name, tensor


def existing_transform(model: nn.Module) -> InputTransform | None:
    """The input transform attached to ``model`` or to any module inside it (the first found), else ``None``."""
    return next((found for module in model.modules() if (found := input_transform_of(module)) is not None), None)


def same_transform(first: InputTransform, second: InputTransform) -> bool:
    """Whether two transforms act alike (one value for all channels equals that value repeated; values compared to
    1e-6)."""
    def close(one: tuple[float, ...], other: tuple[float, ...]) -> bool:
        one, other = one * (len(other) if len(one) == 1 else 1), other * (len(one) if len(other) == 1 else 1)
        return len(one) == len(other) and all(abs(a - b) <= 1e-6 for a, b in zip(one, other))

    return first.size == second.size and close(first.mean, second.mean) and close(first.std, second.std)


@contextmanager
def reading_pixels(model: nn.Module, transform: InputTransform | None) -> Iterator[None]:
    """While inside, ``model`` gets ``transform`` as its input transform (nothing when ``None``), so it reads pixels
    in [0, 1]; the transform is detached afterwards."""
    if transform is None:
        yield
        return
    handle = transform.attach(model)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def defendable(model: nn.Module, transform: InputTransform | None = None) -> Iterator[Callable[[], None]]:
    """``model`` in float32, returning logits and reading pixels (``transform`` attached) while inside; yields the
    rounding function of :func:`computing_in_float32`."""
    with computing_in_float32(model) as round_to_stored, returning_logits(model), reading_pixels(model, transform):
        yield round_to_stored


def as_pixels(images: Tensor, transform: InputTransform | None, what: str) -> tuple[Tensor, bool]:
    """``images`` (N, C, H, W) as float pixels in [0, 1]: uint8 divided by 255; floats outside [0, 1] (by more than
    ``PIXEL_SLACK``) un-normalised with ``transform`` (``x * std + mean``). Returns the images and whether they were
    un-normalised.

    Raises:
        ValueError: (one line) the images are not pixels and there is no transform to undo, or they are still not
            pixels after undoing it.
    """
    if images.dtype == torch.uint8:
        return images.float() / 255, False
    images = images.float()
    if _are_pixels(images):
        return images, False
    low, high = images.min().item(), images.max().item()
    if transform is None:
        raise ValueError(f"the {what} images range over [{low:.2f}, {high:.2f}], not pixels in [0, 1]: pass "
                         f"un-normalised images, or normalize={{mean, std}} (the loader's) so the defense undoes it")
    mean = torch.tensor(transform.mean, device=images.device).view(-1, 1, 1)
    std = torch.tensor(transform.std, device=images.device).view(-1, 1, 1)
    pixels = images * std + mean
    if not _are_pixels(pixels):
        raise ValueError(f"the {what} images range over [{low:.2f}, {high:.2f}] and over [{pixels.min().item():.2f}, "
                         f"{pixels.max().item():.2f}] after undoing normalize {transform.as_dict()}: is it the "
                         f"loader's normalisation?")
    return pixels.clamp(0, 1), True


def _are_pixels(images: Tensor) -> bool:
    return bool(images.min() >= -PIXEL_SLACK) and bool(images.max() <= 1 + PIXEL_SLACK)
