"""Capture a layer's keys (its input, unfolded for convolutions) and values (its output) with forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from lightning_backdoor.defenses.adapt import logits_of
from lightning_backdoor.defenses.residual import bypassed, record_skip, residual_branch_of, transformer_mlp_layers

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class LayerActivations:
    """Per image and position: keys (N, L, d), values = W k without bias (N, L, c_out), and the skip term added to
    the layer's output by a residual block (in the layer's output units: divided by the scale of a norm between the
    layer and the addition), or None. L is 1 for a linear layer and H'·W' for a conv."""

    keys: Tensor
    values: Tensor
    skip: Tensor | None

    def select(self, rows: Tensor) -> LayerActivations:
        """The activations of the images ``rows`` (indices or a boolean mask over N) selects."""
        return LayerActivations(self.keys[rows], self.values[rows], None if self.skip is None else self.skip[rows])

    @staticmethod
    def cat(parts: list[LayerActivations]) -> LayerActivations:
        """The activations of ``parts`` (of one layer), their images one after the other."""
        return LayerActivations(torch.cat([part.keys for part in parts]), torch.cat([part.values for part in parts]),
                                None if parts[0].skip is None else torch.cat([part.skip for part in parts]))


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The editable submodule ``name``; a one-line error lists the valid names if it is missing or unsupported."""
    modules = dict(model.named_modules())
    if name not in modules or (not name and not isinstance(model, SUPPORTED_LAYERS)):  # '' names the whole model
        raise ValueError(f"unknown layer {name!r}; editable layers: {', '.join(editable_layers(model))}")
    layer = modules[name]
    if not isinstance(layer, SUPPORTED_LAYERS):
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}; supported: nn.Linear and nn.Conv2d with "
                         f"groups=1 ({', '.join(editable_layers(model))})")
    reason = skip_reason(layer)
    if reason is not None:
        raise ValueError(f"layer {name!r} cannot be edited: {reason}; editable layers: "
                         f"{', '.join(editable_layers(model))}")
    return layer


def editable_layers(model: nn.Module) -> list[str]:
    """Names of the layers an edit can target, in forward-definition order: ``nn.Linear`` and ``nn.Conv2d`` with
    ``groups=1`` whose forward is torch's own (see :func:`skipped_layers` for the others)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, SUPPORTED_LAYERS) and skip_reason(module) is None]


def skipped_layers(model: nn.Module) -> dict[str, str]:
    """The weighted linear and convolution layers an edit cannot target, by name (forward-definition order), each
    with the reason in words, e.g. ``{"blocks.0.dw": "depthwise conv (groups=16) cannot be edited as one
    key->value map"}``. Norm layers and embeddings are not listed: they are never candidates."""
    return {name: reason for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and (reason := skip_reason(module)) is not None}


def skip_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` (a linear or convolution layer) cannot be edited, or ``None`` if it can.

    An edit reads a layer as one map from keys (its inputs, unfolded for a conv) to values (``W k``), so the layer's
    output must be exactly torch's ``F.linear``/``F.conv2d`` of its weight and settings: a grouped conv has one map
    per group, and a subclass with its own ``forward`` (e.g. timm's ``Conv2dSame`` padding at run time or
    ``StdConv2d`` standardising its weight) computes something the keys would not match."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        kind = "depthwise" if layer.groups == layer.in_channels else "grouped"
        return f"{kind} conv (groups={layer.groups}) cannot be edited as one key->value map"
    if not isinstance(layer, SUPPORTED_LAYERS):
        return f"{type(layer).__name__} is neither an nn.Linear nor an nn.Conv2d"
    if isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return ("the output projection of an nn.MultiheadAttention, which uses its weight without calling it (no hook "
                "fires)")
    base = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
    if type(layer).forward is not base.forward:
        return (f"{type(layer).__name__} overrides {base.__name__}.forward, so its output is not its weight applied "
                f"to its unfolded input")
    return None


def auto_candidates(model: nn.Module, count: int, images: Tensor | None = None) -> list[str]:
    """The layers ``layer: auto`` tries, in definition order: the last ``count`` of the model's ``edit_candidates``
    where it declares them (a list of layer names, e.g. a ViT's last blocks' MLP layers; on a transformer that
    declares fewer than ``count``, the MLP layers of its last ``count / 2`` blocks instead); else, on a timm Vision
    Transformer (with or without LayerScale), the last ``count`` of the MLP layers of its last two blocks, or of more
    blocks where ``count`` exceeds 4 (:func:`~lightning_backdoor.defenses.residual.transformer_mlp_layers`); else the
    last ``count`` of :func:`editable_layers`. Given ``images`` (N >= 1, C, H, W) to probe the model with, and when
    most of those layers act on globally pooled features (one key per image: a multi-layer classifier head), also the
    last ``count`` layers with spatial keys (more than one position per image) that no residual block bypasses
    (:func:`~lightning_backdoor.defenses.residual.bypassed`).

    The second set reaches behind a pooled head and behind the layers a skip path bypasses, to the last
    convolutions whose output is the whole representation or a corrected residual branch: on a MobileNetV3-Small
    (two-layer head) the project convs of its last blocks, where the edit left 3–4 pt above the ASR floor against
    10–33 pt at its head (measured on held-out images, docs/results/mobilenet.md). Nets with a one-layer head (the
    compact CNN, PreAct-ResNet18, VGG) keep the last ``count`` layers: there the earlier spatial layers won the
    cross-validated loss on the unseen split but left the quickstart's ASR 3 pt above its floor, against 0.2 pt."""
    declared = getattr(model, "edit_candidates", None)
    if declared and count > len(declared):  # more than it declares: more blocks' MLP layers, on a transformer
        declared = transformer_mlp_layers(model, -(-count // 2)) or declared
    declared = declared or transformer_mlp_layers(model, max(2, -(-count // 2)))
    if declared:
        return list(declared)[-count:]
    layers = editable_layers(model)
    chosen = set(layers[-count:])
    if images is not None:
        positions = key_positions(model, layers, images[:1])
        if 2 * sum(positions[name] == 1 for name in layers[-count:]) > count:
            chosen |= set([name for name in layers if positions[name] > 1 and not bypassed(model, name)][-count:])
    return [name for name in layers if name in chosen]


@torch.no_grad()
def key_positions(model: nn.Module, layer_names: list[str], images: Tensor) -> dict[str, int]:
    """How many keys per image each layer in ``layer_names`` reads from ``images`` (N, C, H, W): H'·W' for a conv,
    the positions (tokens) of a linear layer's input, 1 for a layer on pooled features. One forward pass in eval
    mode."""
    positions: dict[str, int] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            positions[name] = to_values(output).shape[1]
        return hook

    handles = [get_layer(model, name).register_forward_hook(recorder(name)) for name in layer_names]
    run_with_hooks(model, images, handles, len(images))
    return {name: positions.get(name, 0) for name in layer_names}  # 0: not run on this forward pass


def layer_weight_matrix(layer: nn.Module) -> Tensor:
    """The weight as a (c_out, d) matrix acting on keys."""
    return layer.weight.detach().flatten(1)


def to_keys(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Layer inputs -> keys (N, L, d): unfolded patches for a conv (any kernel, stride, padding, dilation), ordered
    like ``weight.flatten(1)``; strided views and one copy (several times faster than ``F.unfold`` on CPU)."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(inputs, layer._reversed_padding_repeated_twice, mode=mode)
    (kernel_h, kernel_w), (stride_h, stride_w), (dilation_h, dilation_w) = (layer.kernel_size, layer.stride,
                                                                          layer.dilation)
    patches = padded.unfold(2, (kernel_h - 1) * dilation_h + 1, stride_h)[..., ::dilation_h]
    patches = patches.unfold(3, (kernel_w - 1) * dilation_w + 1, stride_w)[..., ::dilation_w]
    batch, channels, height, width = patches.shape[:4]  # (N, C, H', W', kh, kw)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, height * width, channels * kernel_h * kernel_w)


def to_values(outputs: Tensor) -> Tensor:
    """Layer outputs (N, c_out, H', W') or (N, c_out) -> (N, L, c_out)."""
    if outputs.ndim == 4:
        return outputs.flatten(2).transpose(1, 2)
    return outputs.reshape(outputs.shape[0], -1, outputs.shape[-1])


@torch.no_grad()
def capture(model: nn.Module, layer_names: list[str], images: Tensor, batch_size: int = 500, bf16: bool = False
            ) -> dict[str, LayerActivations]:
    """Run ``images`` (N, C, H, W) through ``model`` once in eval mode and record keys, values and skip terms of
    every layer in ``layer_names`` (see :func:`capture_with_logits`)."""
    return capture_with_logits(model, layer_names, images, batch_size, bf16)[0]


@torch.no_grad()
def capture_with_logits(model: nn.Module, layer_names: list[str], images: Tensor, batch_size: int = 500,
                        bf16: bool = False) -> tuple[dict[str, LayerActivations], Tensor]:
    """As :func:`capture`, and the model's logits (N, K) of the same pass (float32), so that no later step runs the
    unedited model on these images again.

    With ``bf16`` the pass runs under bfloat16 autocast and keys are held in bfloat16 (the precision a bf16 layer
    reads them in; half the memory), so that their moments are multiplied in bfloat16
    (:func:`~lightning_backdoor.defenses.editing.moment`); values and skip terms are kept in float32.
    """
    layers = {name: get_layer(model, name) for name in layer_names}
    branches = {name: residual_branch_of(model, name) for name in layer_names}
    records: dict[str, list[Tensor]] = {}

    def recorder(key: str, take_input: bool):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            # the output as a float32 copy: a later module may change it in place (an in-place LayerScale)
            records.setdefault(key, []).append(args[0] if take_input else output.to(torch.float32, copy=True))
        return hook

    handles = []
    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(recorder(f"{name}:in", True)))
        handles.append(layer.register_forward_hook(recorder(f"{name}:out", False)))
        if branches[name] is not None:
            handles += record_skip(model, name, branches[name], records.setdefault(f"{name}:skip", []))
    logits = run_with_hooks(model, images, handles, batch_size, bf16)
    captured = {}
    for name, layer in layers.items():
        inputs = torch.cat(records[f"{name}:in"])
        outputs = torch.cat(records[f"{name}:out"])
        skip = to_values(torch.cat(records[f"{name}:skip"])) if branches[name] is not None else None
        if layer.bias is not None:
            bias = layer.bias.detach().float()
            outputs = outputs - (bias.view(-1, 1, 1) if outputs.ndim == 4 else bias)
        keys = to_keys(layer, inputs.to(torch.bfloat16 if bf16 else torch.float32))
        captured[name] = LayerActivations(keys, to_values(outputs), skip)
    return captured, logits


#: the elementwise activations a block may apply to its residual sum (:func:`check_residual_sums`): the edit maps a
#: triggered sum onto its clean sum, which holds for any of them.
SUM_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"none": lambda x: x, "relu": F.relu, "gelu": F.gelu,
                                                          "silu": F.silu}


@torch.no_grad()
def check_residual_sums(model: nn.Module, layer_names: list[str], images: Tensor) -> None:
    """Check, on ``images`` (N >= 1, C, H, W), that the residual block of every layer in ``layer_names`` whose skip
    term is read at its source (a torchvision or timm ResNet block, or a block declaring ``residual_shortcut``:
    :func:`~lightning_backdoor.defenses.residual.residual_branch_of`) outputs an elementwise activation
    (:data:`SUM_ACTIVATIONS`) of its branch's output (through the norm) plus that skip term, as the correction
    assumes. One forward pass in eval mode.

    Raises:
        ValueError: (one line) a block whose output is no such function: its declaration does not describe its
            forward.
    """
    branches = {name: branch for name in layer_names
                if (branch := residual_branch_of(model, name)) is not None and branch.activated}
    records: dict[str, dict[str, list[Tensor]]] = {name: {"branch": [], "skip": [], "output": []} for name in branches}

    def keep(sink: list[Tensor], take_input: bool = False):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor | None = None) -> None:
            sink.append((args[0] if take_input else output).detach().to(torch.float32, copy=True))
        return hook

    handles = []
    for name, branch in branches.items():
        record, block = records[name], model.get_submodule(branch.block)
        handles.append(model.get_submodule(branch.scale or name).register_forward_hook(keep(record["branch"])))
        handles.append(model.get_submodule(branch.shortcut).register_forward_hook(keep(record["skip"]))
                       if branch.shortcut else block.register_forward_pre_hook(keep(record["skip"], True)))
        handles.append(block.register_forward_hook(keep(record["output"])))
    run_with_hooks(model, images, handles, len(images))
    for name, record in records.items():
        total = torch.cat(record["branch"]) + torch.cat(record["skip"])
        output = torch.cat(record["output"])
        tolerance = 1e-4 * output.abs().max().item() + 1e-6
        gaps = {kind: (output - activation(total)).abs().max().item() for kind, activation in SUM_ACTIVATIONS.items()}
        if min(gaps.values()) > tolerance:
            raise ValueError(f"layer {name}: its block {branches[name].block!r} does not output an activation of "
                             f"the branch's output plus its skip term on these images (smallest largest difference "
                             f"{min(gaps.values()):.3g}): the block's residual declaration does not describe its "
                             f"forward")


@torch.no_grad()
def layer_input(model: nn.Module, name: str, images: Tensor, batch_size: int = 500) -> Tensor:
    """The input of layer ``name`` for ``images`` (eval mode, float32), e.g. (N, C, H, W) for a conv."""
    captured: list[Tensor] = []
    handle = get_layer(model, name).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    run_with_hooks(model, images, [handle], batch_size)
    return torch.cat(captured).float()


def channels_last(images: Tensor) -> Tensor:
    """Images (N, C, H, W) in channels-last memory order (the same values; the trigger inversion's passes take them
    so); tensors of other ranks unchanged. Not used by the edit's passes: on PreAct-ResNet18 with contiguous weights
    they ran 1.3-1.5x slower so (1.3-2.3x faster on the compact CNN; docs/results/edit-cost.md)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


def run_with_hooks(model: nn.Module, images: Tensor, handles: list[RemovableHandle], batch_size: int,
                   bf16: bool = False) -> Tensor:
    """Run ``images`` through ``model`` in eval mode, in chunks (under bfloat16 autocast with ``bf16``), for its
    hooks; then remove ``handles`` and restore the training mode, also on error. Returns the logits (N, K) as
    float32."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
            return torch.cat([logits_of(model(chunk)).float() for chunk in images.split(batch_size)])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@contextmanager
def rewriting_input(model: nn.Module, name: str, rewrite: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While inside, layer ``name`` receives ``rewrite(x)`` (cast back to x's dtype) in place of its input x."""
    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return rewrite(args[0]).to(args[0].dtype), *args[1:]
    handle = get_layer(model, name).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
