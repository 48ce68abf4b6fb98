"""Where a layer's output meets a skip path: the residual blocks the edit corrects its target for.

A block's output is ``scale(layer(·)) + skip`` (``scale`` optional: a per-channel affine map, an eval-mode
``BatchNorm2d`` or timm's ``LayerScale``) when the block declares ``residual_branch`` (the layer's dotted path below
it) and, where such a module sits between that layer and the addition, ``residual_norm`` (its path below the
block). torchvision's inverted-residual blocks (MobileNetV2/V3, EfficientNet's
``MBConv``/``FusedMBConv``, MNASNet) declare nothing but have this form, ``x + body(x)`` with a body ending in a
convolution and its ``BatchNorm2d``; they are recognised by their class (:data:`TORCHVISION_RESIDUAL_BLOCKS`). So
is timm's Vision Transformer ``Block`` (ViT, DeiT, DeiT-III and the other ``vision_transformer`` models), whose output
is the residual stream plus ``mlp.fc2``'s output, through its second ``LayerScale`` where it has one (``ls2``,
:data:`TIMM_BLOCK`, :data:`TIMM_LAYER_SCALE`), and torchvision's ``EncoderBlock`` (its ``vit_*`` models), whose
output is the stream plus ``mlp.3``'s (:data:`TORCHVISION_VIT_BLOCK`).
torchvision's and timm's ResNet blocks (``BasicBlock``, ``Bottleneck``: :data:`TORCHVISION_RESNET_BLOCKS`) apply a
ReLU to that sum: the edit maps the sum of a triggered image onto its clean sum, and with it the block's output;
their skip term is read where it comes from (the block's input, or its ``downsample`` path's output), not as
output − branch. A block of any other class is recognised from its forward traced with ``torch.fx``
(:func:`_traced_branch`: ``[activation](bn(conv(·)) + skip)``), or by its ``residual_branch``/``residual_norm``/
``residual_shortcut`` declaration.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from lightning_backdoor.defenses.tracing import symbolic_trace

#: torchvision's residual blocks whose output is ``x + body(x)`` in eval mode when the flag is true: class (module
#: and qualified name) -> (the body's attribute, the flag's attribute). Their stochastic depth is the identity in eval.
TORCHVISION_RESIDUAL_BLOCKS = {
    "torchvision.models.mobilenetv2.InvertedResidual": ("conv", "use_res_connect"),
    "torchvision.models.mobilenetv3.InvertedResidual": ("block", "use_res_connect"),
    "torchvision.models.efficientnet.MBConv": ("block", "use_res_connect"),
    "torchvision.models.efficientnet.FusedMBConv": ("block", "use_res_connect"),
    "torchvision.models.mnasnet._InvertedResidual": ("layers", "apply_residual"),
}


#: torchvision's and timm's ResNet blocks, ``act(norm(layer(·)) + shortcut)`` in eval mode with ``shortcut`` the
#: block's input or its ``downsample`` path's output: class (module and qualified name) -> (the branch layer, its
#: BatchNorm). The activation acts on the sum, so a triggered image whose sum is mapped onto its clean sum gets its
#: clean output. timm's blocks qualify without squeeze-excitation (``se`` is ``None``); their stochastic depth is the
#: identity in eval.
TORCHVISION_RESNET_BLOCKS = {
    "torchvision.models.resnet.BasicBlock": ("conv2", "bn2"),
    "torchvision.models.resnet.Bottleneck": ("conv3", "bn3"),
    "timm.models.resnet.BasicBlock": ("conv2", "bn2"),
    "timm.models.resnet.Bottleneck": ("conv3", "bn3"),
}


#: timm's transformer block (``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``, each through a LayerScale, the
#: identity without ``init_values``, and a stochastic depth, the identity in eval) and its MLP class: the class names,
#: read without importing timm, and the branch layer whose output the block adds to its residual stream.
TIMM_BLOCK = ("timm.models.vision_transformer.Block", "timm.layers.mlp.Mlp", "mlp.fc2")

#: torchvision's Vision Transformer block (``x = x + attention(ln_1(·)); x + mlp(ln_2(x))``, dropout the identity in
#: eval) and its MLP class (``Linear, activation, Dropout, Linear, Dropout``): the class names, and the MLP's two
#: Linear layers, the second the branch whose output the block adds to its residual stream.
TORCHVISION_VIT_BLOCK = ("torchvision.models.vision_transformer.EncoderBlock",
                         "torchvision.models.vision_transformer.MLPBlock", ("mlp.0", "mlp.3"))

#: timm's LayerScale (``x * gamma``, ``gamma`` of shape (C,) on the last dim; ``init_values`` of a ViT, e.g. DeiT-III):
#: its class paths (where timm defines it now, and where earlier versions did), read without importing timm. Between
#: ``fc2`` and the addition it is a per-channel scale, as an eval-mode BatchNorm without shift.
TIMM_LAYER_SCALE = ("timm.layers.layer_scale.LayerScale", "timm.models.vision_transformer.LayerScale")


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _timm_branch(block: nn.Module) -> tuple[str, str | None] | None:
    """``("mlp.fc2", scale)`` for a timm ``Block`` (exactly that class: a subclass may reorder its forward) whose MLP
    is timm's ``Mlp`` ending in an ``nn.Linear``: ``scale`` is ``None`` when its second LayerScale is the identity,
    ``"ls2"`` when it is timm's ``LayerScale`` with one factor per channel (``gamma`` (C,)); else ``None`` (e.g. a
    LayerScale of another class, whose forward may not be ``x * gamma``)."""
    block_class, mlp_class, branch = TIMM_BLOCK
    if _class_path(block) != block_class:
        return None
    mlp = getattr(block, "mlp", None)
    if mlp is None or _class_path(mlp) != mlp_class or not isinstance(getattr(mlp, "fc2", None), nn.Linear):
        return None
    layer_scale = getattr(block, "ls2", None)
    if isinstance(layer_scale, nn.Identity):
        return branch, None
    if layer_scale is not None and _class_path(layer_scale) in TIMM_LAYER_SCALE and _per_channel(layer_scale):
        return branch, "ls2"
    return None


def _torchvision_vit_branch(block: nn.Module) -> tuple[str, None] | None:
    """``("mlp.3", None)`` for a torchvision ``EncoderBlock`` (exactly that class) whose MLP is torchvision's
    ``MLPBlock`` of a Linear, an activation, a Dropout, a Linear and a Dropout; else ``None``."""
    block_class, mlp_class, (_, branch) = TORCHVISION_VIT_BLOCK
    mlp = getattr(block, "mlp", None)
    if _class_path(block) != block_class or mlp is None or _class_path(mlp) != mlp_class or len(mlp) != 5:
        return None
    if not (isinstance(mlp[0], nn.Linear) and isinstance(mlp[3], nn.Linear) and isinstance(mlp[4], nn.Dropout)):
        return None
    return branch, None


def _mlp_layers(block: nn.Module) -> tuple[str, str] | None:
    """The two Linear layers of a recognised transformer block's MLP (timm's ``mlp.fc1``/``mlp.fc2``, torchvision's
    ``mlp.0``/``mlp.3``), or ``None`` for any other module."""
    if _timm_branch(block) is not None:
        return "mlp.fc1", "mlp.fc2"
    return TORCHVISION_VIT_BLOCK[2] if _torchvision_vit_branch(block) is not None else None


def _per_channel(layer_scale: nn.Module) -> bool:
    gamma = getattr(layer_scale, "gamma", None)
    return isinstance(gamma, Tensor) and gamma.ndim == 1


def transformer_mlp_layers(model: nn.Module, blocks: int = 2) -> list[str]:
    """The MLP layers (``fc1``, ``fc2``; torchvision's ``mlp.0``, ``mlp.3``) of the last ``blocks`` transformer
    blocks of ``model`` that :func:`_timm_branch` (with or without LayerScale) or :func:`_torchvision_vit_branch`
    recognise, in definition order; ``[]`` for a model without such blocks. What ``layer: auto`` tries on a timm or
    torchvision ViT that declares no ``edit_candidates``: the same layers the registry's ``vit`` declares (on it the
    second-to-last block's ``fc2`` won, the last block's left more ASR; docs/results/vit.md)."""
    found = [(name, layers) for name, module in model.named_modules() if (layers := _mlp_layers(module)) is not None]
    return [f"{name}.{layer}" for name, layers in found[-blocks:] for layer in layers] if blocks > 0 else []


@dataclass(frozen=True)
class ResidualBranch:
    """A layer whose output reaches a residual addition: ``block`` (its name in the model, ``""`` for the model
    itself) outputs ``scale(layer(·)) + skip``, or with ``activated`` possibly an activation of that sum (torchvision's
    and timm's ResNet blocks, blocks found by tracing or declaring ``residual_shortcut``); ``scale`` is the full name
    of the per-channel affine module in between (an eval-mode ``BatchNorm2d`` or a timm ``LayerScale``,
    :func:`channel_scale`), or ``None`` when the layer's output is added as it is. The skip term is the block's output
    minus the branch's, or with ``activated`` the output of ``shortcut`` (the full name of the module whose output it
    is, e.g. a downsampling path) or, where that is ``None``, the block's input."""

    block: str
    scale: str | None = None
    activated: bool = False
    shortcut: str | None = None


def declared_branch(block: nn.Module) -> tuple[str, str | None] | None:
    """``(layer path, scale path or None)`` below ``block`` for the layer whose output the block adds to its skip
    path: as the block declares it (``residual_branch``, ``residual_norm``; a block that applies an activation to the
    sum also declares ``residual_shortcut``, see :func:`residual_branch_of`); for a timm transformer ``Block``,
    ``mlp.fc2`` and its LayerScale ``ls2`` or ``None`` (:func:`_timm_branch`); for a torchvision ``EncoderBlock``,
    ``mlp.3`` (:func:`_torchvision_vit_branch`); for a torchvision inverted-residual
    block with its residual connection on, its body's last convolution and the ``BatchNorm2d`` after it; for a
    torchvision ResNet block, its last convolution and BatchNorm (:func:`_resnet_branch`); for a block of any other
    class, what its traced forward shows (:func:`_traced_branch`); else ``None``."""
    branch = _block_branch(block)
    return None if branch is None else (branch[0], branch[1])


def _block_branch(block: nn.Module) -> tuple[str, str | None, bool, str | None] | None:
    """:func:`declared_branch`'s ``(layer, scale)`` with how the skip term is read: ``(layer, scale, activated,
    shortcut)``, all paths below ``block``; ``activated`` (the block may apply an activation to its sum, so the skip
    is read at its source): ``shortcut`` is the module whose output is the skip, ``None`` for the block's input."""
    declared = getattr(block, "residual_branch", None)
    if declared:
        shortcut = getattr(block, "residual_shortcut", None)
        return declared, getattr(block, "residual_norm", None), shortcut is not None, shortcut or None
    transformer_branch = _timm_branch(block) or _torchvision_vit_branch(block)
    if transformer_branch is not None:
        return *transformer_branch, False, None
    resnet_branch = _resnet_branch(block)
    if resnet_branch is not None:
        return *resnet_branch, True, None if block.downsample is None else "downsample"
    kind = TORCHVISION_RESIDUAL_BLOCKS.get(_class_path(block))
    if kind is None:
        traced = _traced_branch(block)
        return None if traced is None else (*traced[:2], True, traced[2])
    if not getattr(block, kind[1], False):
        return None
    body = kind[0]
    leaves = [(name, module) for name, module in block.get_submodule(body).named_modules()
              if not any(True for _ in module.children())]
    if len(leaves) < 2:
        return None
    (layer_name, layer), (norm_name, norm) = leaves[-2:]
    if not (isinstance(layer, nn.Conv2d) and type(norm) is nn.BatchNorm2d and norm.track_running_stats):
        return None  # e.g. a body ending in an activation: its output is no affine map of the conv's
    return f"{body}.{layer_name}", f"{body}.{norm_name}", False, None


#: what may follow a traced block's residual add (:func:`_traced_branch`): elementwise activations, as modules,
#: functions or tensor methods; :func:`~lightning_backdoor.defenses.activations.check_residual_sums` checks the
#: block's output numerically before any edit.
_ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU)
_ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.gelu, F.silu)
_ADDS = (operator.add, operator.iadd, torch.add)
_TRACED: weakref.WeakKeyDictionary[nn.Module, tuple[str, str | None, str | None] | None] = (
    weakref.WeakKeyDictionary())


def _traced_branch(block: nn.Module) -> tuple[str, str | None, str | None] | None:
    """``(layer, scale, shortcut)`` below ``block`` where its traced forward (``torch.fx``) ends in
    ``[activation](scale(layer(·)) + skip)``: ``layer`` a ``Conv2d`` or ``Linear``, ``scale`` an eval-mode
    ``BatchNorm2d`` or ``None``, ``skip`` the block's input (``shortcut`` ``None``) or the output of a module
    (``shortcut`` its path), each of these modules called once; else ``None`` (also for a block that does not trace,
    a container, a module without children). How a residual block of a class the edit does not know is found
    (the CIFAR ResNets of backdoor code); cached per module."""
    if block in _TRACED:
        return _TRACED[block]
    found = None
    if next(block.children(), None) is not None and not isinstance(block, (nn.Sequential, nn.ModuleList,
                                                                               nn.ModuleDict)):
        try:
            graph = symbolic_trace(block).graph
        except Exception:  # noqa: BLE001 - any forward fx cannot trace: not recognised, as before
            graph = None
        found = None if graph is None else _branch_in_graph(block, graph)
    _TRACED[block] = found
    return found


def _branch_in_graph(block: nn.Module, graph: fx.Graph) -> tuple[str, str | None, str | None] | None:
    """:func:`_traced_branch`'s pattern in ``graph``, the traced forward of ``block``."""
    nodes = list(graph.nodes)
    calls = [node.target for node in nodes if node.op == "call_module"]
    module = lambda node, kinds: (node.op == "call_module"  # noqa: E731
                                  and isinstance(block.get_submodule(node.target), kinds)
                                  and calls.count(node.target) == 1)
    (result,) = next(node for node in nodes if node.op == "output").args
    if not isinstance(result, fx.Node):
        return None
    if (result.op == "call_module" and isinstance(block.get_submodule(result.target), _ACTIVATION_MODULES)
            or result.op == "call_function" and result.target in _ACTIVATION_FUNCTIONS
            or result.op == "call_method" and result.target == "relu"):
        result = result.args[0]
    if not (isinstance(result, fx.Node) and len(result.args) == 2 and not result.kwargs
            and (result.op == "call_function" and result.target in _ADDS
                 or result.op == "call_method" and result.target in ("add", "add_"))):
        return None
    for branch, skip in (result.args, result.args[::-1]):
        if not (isinstance(branch, fx.Node) and isinstance(skip, fx.Node)):
            continue
        scale = None
        if module(branch, nn.BatchNorm2d) and len(branch.users) == 1:
            scale, branch = branch.target, branch.args[0]
        if not (isinstance(branch, fx.Node) and module(branch, (nn.Conv2d, nn.Linear))):
            continue
        if skip.op == "placeholder" and skip is nodes[0]:
            return branch.target, scale, None
        if skip.op == "call_module" and calls.count(skip.target) == 1:
            return branch.target, scale, skip.target
    return None


def _resnet_branch(block: nn.Module) -> tuple[str, str] | None:
    """``(layer, norm)`` for a torchvision or timm ResNet block (exactly that class: a subclass may change its
    forward) whose branch is a ``Conv2d`` followed by an eval-mode ``BatchNorm2d`` and nothing else before the add
    (no squeeze-excitation: :data:`TORCHVISION_RESNET_BLOCKS`), else ``None``."""
    kind = TORCHVISION_RESNET_BLOCKS.get(_class_path(block))
    if kind is None or getattr(block, "se", None) is not None:
        return None
    layer, norm = (getattr(block, name, None) for name in kind)
    if not (isinstance(layer, nn.Conv2d) and type(norm) is nn.BatchNorm2d and norm.track_running_stats):
        return None
    return kind


def residual_branch_of(model: nn.Module, name: str) -> ResidualBranch | None:
    """The residual block of layer ``name``: the nearest ancestor whose :func:`declared_branch` is the layer's path
    below it (``"conv2"`` in a PreAct-ResNet or torchvision ResNet block, ``"mlp.fc2"`` in a transformer block,
    ``"block.3.0"`` in a torchvision MobileNetV3 block), with the per-channel scale in between and, for a block that
    applies an activation to its sum (a torchvision or timm ResNet block, or one declaring ``residual_shortcut``),
    where its skip term is read; ``None`` when no ancestor adds the layer's output to a skip path.

    Raises:
        ValueError: (one line) the block declares a ``residual_norm`` that is no per-channel scale
            (:func:`channel_scale`), or a ``residual_shortcut`` that is no submodule of it.
    """
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        block_name = ".".join(parts[:depth])
        block = model.get_submodule(block_name) if block_name else model
        branch = _block_branch(block)
        if branch is None or branch[0] != ".".join(parts[depth:]):
            continue
        layer, scale, activated, shortcut = branch
        scale = None if scale is None else ".".join(filter(None, (block_name, scale)))
        if scale is not None:
            channel_scale(model.get_submodule(scale))  # a module that is no per-channel scale: refused here
        if shortcut is not None:
            try:
                block.get_submodule(shortcut)
            except AttributeError:
                raise ValueError(f"{_class_path(block)} declares residual_shortcut={shortcut!r}, which is no "
                                 f"submodule of it; name the child whose output the block adds (\"\" for the "
                                 f"block's input)") from None
            shortcut = ".".join(filter(None, (block_name, shortcut)))
        return ResidualBranch(block_name, scale, activated, shortcut)
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


def channel_scale(module: nn.Module) -> Tensor:
    """The per-channel factor (C,) float32 that ``module`` multiplies its input by: γ / √(running var + ε) for an
    eval-mode ``BatchNorm2d``, ``gamma`` for a timm ``LayerScale``.

    Raises:
        ValueError: (one line) for any other module (it is no known per-channel scale).
    """
    if isinstance(module, nn.BatchNorm2d):
        scale = (module.running_var.detach().float() + module.eps).rsqrt()
        return scale if module.weight is None else scale * module.weight.detach().float()
    if _class_path(module) in TIMM_LAYER_SCALE and _per_channel(module):
        return module.gamma.detach().float()
    raise ValueError(f"{_class_path(module)} between a residual branch and its add is no per-channel scale the edit "
                     f"knows (an eval-mode BatchNorm2d, or a timm LayerScale with gamma of shape (C,)); declare "
                     f"residual_norm only for those")


def skip_in_value_space(skip: Tensor, scaler: nn.Module | None) -> Tensor:
    """The skip term ``skip`` (N, C, H, W) or (N, ..., C) expressed in the edited layer's output units: divided by
    the per-channel scale of ``scaler`` (:func:`channel_scale`) when one sits between the layer and the addition, so
    that a change ``δ`` of the layer's output moves the block's sum by ``scale · δ``. Channels scaled by 0 cannot be
    reached by the layer: their term is 0."""
    if scaler is None:
        return skip
    scale = channel_scale(scaler)
    inverse = (1 / scale).where(scale.abs() > 1e-12, scale.new_zeros(()))
    return skip * (inverse.view(-1, 1, 1) if skip.ndim == 4 else inverse)


def record_skip(model: nn.Module, layer: str, branch: ResidualBranch, sink: list[Tensor]) -> list[RemovableHandle]:
    """Hook ``model`` so that every forward pass appends the skip term of layer ``layer`` in ``branch`` to ``sink``:
    (N, C, H, W) or (N, ..., C) float32, in the layer's output units (:func:`skip_in_value_space`). Returns the
    hooks' handles (remove them when done)."""
    scaler = None if branch.scale is None else model.get_submodule(branch.scale)
    if branch.activated:  # the block outputs act(sum): read the skip term where it comes from
        def keep_shortcut(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            sink.append(skip_in_value_space(output.detach().to(torch.float32, copy=True), scaler))

        def keep_input(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            sink.append(skip_in_value_space(args[0].detach().to(torch.float32, copy=True), scaler))

        if branch.shortcut is not None:
            return [model.get_submodule(branch.shortcut).register_forward_hook(keep_shortcut)]
        return [model.get_submodule(branch.block).register_forward_pre_hook(keep_input)]
    pending: list[Tensor] = []

    def keep_branch_output(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        # a copy: the block may add its skip to this very tensor in place (torchvision's `result += input`; an in-place
        # LayerScale multiplies fc2's output)
        pending.append(output.detach().to(torch.float32, copy=True))

    def keep_skip(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        sink.append(skip_in_value_space(output.detach().float() - pending.pop(), scaler))

    return [model.get_submodule(layer if scaler is None else branch.scale).register_forward_hook(keep_branch_output),
            model.get_submodule(branch.block).register_forward_hook(keep_skip)]


__all__ = ["TIMM_BLOCK", "TIMM_LAYER_SCALE", "TORCHVISION_RESIDUAL_BLOCKS", "TORCHVISION_RESNET_BLOCKS",
           "TORCHVISION_VIT_BLOCK", "ResidualBranch", "bypassed",
           "channel_scale", "declared_branch", "residual_block_of", "record_skip", "residual_branch_of",
           "skip_in_value_space", "transformer_mlp_layers"]
