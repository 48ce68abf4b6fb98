"""Where a layer's output meets a skip path: the residual blocks the edit corrects its target for.

A block's output is ``norm(layer(·)) + skip`` (``norm`` optional) when the block declares ``residual_branch`` (the
layer's dotted path below it) and, where an eval-mode ``BatchNorm2d`` sits between that layer and the addition,
``residual_norm`` (its path below the block). torchvision's inverted-residual blocks (MobileNetV2/V3, EfficientNet's
``MBConv``/``FusedMBConv``, MNASNet) declare nothing but have this form, ``x + body(x)`` with a body ending in a
convolution and its ``BatchNorm2d``; they are recognised by their class (:data:`TORCHVISION_RESIDUAL_BLOCKS`). So
is timm's Vision Transformer ``Block`` (ViT, DeiT and the other ``vision_transformer`` models), whose output is the
residual stream plus ``mlp.fc2``'s output when it has no LayerScale (:data:`TIMM_BLOCK`).
torchvision's ResNet blocks apply a ReLU after their addition, so their output is no such sum: they stay
undeclared and their layers are edited without the correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: torchvision's residual blocks whose output is ``x + body(x)`` in eval mode when the flag is true: class (module
#: and qualified name) -> (the body's attribute, the flag's attribute). Their stochastic depth is the identity in eval.
TORCHVISION_RESIDUAL_BLOCKS = {
    "torchvision.models.mobilenetv2.InvertedResidual": ("conv", "use_res_connect"),
    "torchvision.models.mobilenetv3.InvertedResidual": ("block", "use_res_connect"),
    "torchvision.models.efficientnet.MBConv": ("block", "use_res_connect"),
    "torchvision.models.efficientnet.FusedMBConv": ("block", "use_res_connect"),
    "torchvision.models.mnasnet._InvertedResidual": ("layers", "apply_residual"),
}


#: timm's transformer block (``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``, each through a LayerScale, the
#: identity without ``init_values``, and a stochastic depth, the identity in eval) and its MLP class: the class names,
#: read without importing timm, and the branch layer whose output the block adds to its residual stream.
TIMM_BLOCK = ("timm.models.vision_transformer.Block", "timm.layers.mlp.Mlp", "mlp.fc2")


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _timm_branch(block: nn.Module) -> str | None:
    """``"mlp.fc2"`` for a timm ``Block`` (exactly that class: a subclass may reorder its forward) whose MLP is timm's
    ``Mlp`` ending in an ``nn.Linear`` and whose second LayerScale is the identity; else ``None``. A LayerScale
    multiplies fc2's output before the addition, so such a block's output is no key -> value map of fc2's plus the
    stream: it stays undeclared and its ``fc2`` is edited without the correction."""
    block_class, mlp_class, branch = TIMM_BLOCK
    if _class_path(block) != block_class:
        return None
    mlp = getattr(block, "mlp", None)
    if mlp is None or _class_path(mlp) != mlp_class or not isinstance(getattr(mlp, "fc2", None), nn.Linear):
        return None
    return branch if isinstance(getattr(block, "ls2", None), nn.Identity) else None


def transformer_mlp_layers(model: nn.Module, blocks: int = 2) -> list[str]:
    """The MLP layers (``fc1``, ``fc2``) of the last ``blocks`` timm transformer blocks of ``model`` that
    :func:`_timm_branch` recognises, in definition order; ``[]`` for a model without such blocks (a LayerScale ViT's
    blocks are not recognised). What ``layer: auto`` tries on a timm ViT that declares no ``edit_candidates``: the
    same layers the registry's ``vit`` declares (on it the second-to-last block's ``fc2`` won, the last block's left
    more ASR; docs/results/vit.md)."""
    names = [name for name, module in model.named_modules() if _timm_branch(module) is not None]
    return [f"{name}.mlp.{layer}" for name in names[-blocks:] for layer in ("fc1", "fc2")] if blocks > 0 else []


@dataclass(frozen=True)
class ResidualBranch:
    """A layer whose output reaches a residual addition: ``block`` (its name in the model, ``""`` for the model
    itself) outputs ``norm(layer(·)) + skip``; ``norm`` is the full name of the eval-mode ``BatchNorm2d`` in between,
    or ``None`` when the layer's output is added as it is."""

    block: str
    norm: str | None = None


def declared_branch(block: nn.Module) -> tuple[str, str | None] | None:
    """``(layer path, norm path or None)`` below ``block`` for the layer whose output the block adds to its skip
    path: as the block declares it (``residual_branch``, ``residual_norm``); for a timm transformer ``Block``
    without LayerScale, ``mlp.fc2`` (:func:`_timm_branch`); for a torchvision inverted-residual block with its
    residual connection on, its body's last convolution and the ``BatchNorm2d`` after it; ``None`` for any other
    block."""
    declared = getattr(block, "residual_branch", None)
    if declared:
        return declared, getattr(block, "residual_norm", None)
    timm_branch = _timm_branch(block)
    if timm_branch is not None:
        return timm_branch, None
    kind = TORCHVISION_RESIDUAL_BLOCKS.get(_class_path(block))
    if kind is None or not getattr(block, kind[1], False):
        return None
    body = kind[0]
    leaves = [(name, module) for name, module in block.get_submodule(body).named_modules()
              if not any(True for _ in module.children())]
    if len(leaves) < 2:
        return None
    (layer_name, layer), (norm_name, norm) = leaves[-2:]
    if not (isinstance(layer, nn.Conv2d) and type(norm) is nn.BatchNorm2d and norm.track_running_stats):
        return None  # e.g. a body ending in an activation: its output is no affine map of the conv's
    return f"{body}.{layer_name}", f"{body}.{norm_name}"


def residual_branch_of(model: nn.Module, name: str) -> ResidualBranch | None:
    """The residual block of layer ``name``: the nearest ancestor whose :func:`declared_branch` is the layer's path
    below it (``"conv2"`` in a PreAct-ResNet block, ``"mlp.fc2"`` in a transformer block, ``"block.3.0"`` in a
    torchvision MobileNetV3 block), with the norm in between; ``None`` when no ancestor adds the layer's output to
    a skip path."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        block_name = ".".join(parts[:depth])
        branch = declared_branch(model.get_submodule(block_name) if block_name else model)
        if branch is not None and branch[0] == ".".join(parts[depth:]):
            norm = branch[1]
            return ResidualBranch(block_name, None if norm is None else ".".join(filter(None, (block_name, norm))))
    return None


def bypassed(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` sits inside a residual block (:func:`declared_branch`) without being its branch: the
    block's skip path carries a trigger past it uncorrected (e.g. a MobileNetV3 block's expand conv or its
    squeeze-excitation), so an edit there cannot remove what the skip carries."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        block_name = ".".join(parts[:depth])
        branch = declared_branch(model.get_submodule(block_name) if block_name else model)
        if branch is not None:
            return branch[0] != ".".join(parts[depth:])
    return False


def residual_block_of(model: nn.Module, name: str) -> str | None:
    """The name of layer ``name``'s residual block (:func:`residual_branch_of`), or ``None``."""
    branch = residual_branch_of(model, name)
    return None if branch is None else branch.block


def norm_scale(norm: nn.BatchNorm2d) -> Tensor:
    """The per-channel factor (C,) an eval-mode ``BatchNorm2d`` multiplies its input by: γ / √(running var + ε)."""
    scale = (norm.running_var.detach().float() + norm.eps).rsqrt()
    return scale if norm.weight is None else scale * norm.weight.detach().float()


def skip_in_value_space(block_output: Tensor, branch_output: Tensor, norm: nn.BatchNorm2d | None) -> Tensor:
    """The skip term ``block_output − branch_output`` (N, C, H, W) or (N, ..., C), expressed in the edited layer's
    output units: divided by the norm's per-channel scale when a norm sits between the layer and the addition
    (``branch_output`` is then the norm's output), so that a change ``δ`` of the layer's output moves the block's
    output by ``scale · δ``. Channels the norm scales by 0 cannot be reached by the layer: their term is 0."""
    skip = block_output - branch_output
    if norm is None:
        return skip
    scale = norm_scale(norm)
    inverse = (1 / scale).where(scale.abs() > 1e-12, scale.new_zeros(()))
    return skip * (inverse.view(-1, 1, 1) if skip.ndim == 4 else inverse)


def record_skip(model: nn.Module, layer: str, branch: ResidualBranch, sink: list[Tensor]) -> list[RemovableHandle]:
    """Hook ``model`` so that every forward pass appends the skip term of layer ``layer`` in ``branch`` to ``sink``:
    (N, C, H, W) or (N, ..., C) float32, in the layer's output units (:func:`skip_in_value_space`). Returns the
    hooks' handles (remove them when done)."""
    norm = None if branch.norm is None else model.get_submodule(branch.norm)
    pending: list[Tensor] = []

    def keep_branch_output(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        # a copy: the block may add its skip to this very tensor in place (torchvision's `result += input`)
        pending.append(output.detach().to(torch.float32, copy=True))

    def keep_skip(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        sink.append(skip_in_value_space(output.detach().float(), pending.pop(), norm))

    return [model.get_submodule(layer if norm is None else branch.norm).register_forward_hook(keep_branch_output),
            model.get_submodule(branch.block).register_forward_hook(keep_skip)]


__all__ = ["TIMM_BLOCK", "TORCHVISION_RESIDUAL_BLOCKS", "ResidualBranch", "bypassed", "declared_branch", "norm_scale",
           "residual_block_of", "record_skip", "residual_branch_of", "skip_in_value_space", "transformer_mlp_layers"]
