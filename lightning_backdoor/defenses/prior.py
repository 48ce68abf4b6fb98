"""A preservation prior from BatchNorm statistics: the edited layer's key moment on data the network was trained on,
as far as its BatchNorm layers remember that data.

With one or a few unseen images per class, the clean key moment C of the edit is estimated from a few hundred keys
in thousands of dimensions; shrinking it towards a multiple of the identity (Ledoit–Wolf) prices every unvisited
direction alike, whether the network uses it or not. A BatchNorm layer's learnt shift β and scale γ are the mean and
standard deviation of its output over the training data, per channel. Replacing that output by independent draws of
N(β, γ²) and letting the network compute on up to the edited layer gives keys whose second moment holds each
channel's training-time energy (not its correlations): a prior to mix into C (as data-free quantisation and
model-inversion methods use the same statistics, e.g. ZeroQ, Cai et al. CVPR 2020; DeepInversion, Yin et al.
CVPR 2020). Measured: docs/results/cifar10.md, "A BatchNorm prior for the preserved keys".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_backdoor.defenses.activations import get_layer, to_keys


class _Reached(Exception):
    """Raised by a hook at the edited layer: nothing after it needs computing."""


def feeding_batchnorm(model: nn.Module, layer_name: str, images: Tensor) -> str:
    """The name of the BatchNorm module that runs last before layer ``layer_name`` in a forward pass of ``images``
    (N, C, H, W), N >= 1, checked to be the only way the images reach the layer: with that BatchNorm's output
    replaced by the same draws, ``images`` and their negatives ``1 - images`` give the layer exactly the same input
    (a tolerance let a randomly initialised MobileNetV3's skip path, 2e-6 apart, through). Runs in
    eval mode; ``model``'s mode is restored.

    Raises:
        ValueError: (one line) the forward never reaches the layer, no BatchNorm runs before it (e.g. a Vision
            Transformer's LayerNorm blocks), or the layer also sees the images another way (a skip path adding
            activations after the BatchNorm, as in torchvision's ResNets, or a parallel branch).
    """
    names = {module: name for name, module in model.named_modules()}
    layer = get_layer(model, layer_name)
    called: list[str] = []

    def note(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        called.append(names[module])

    handles = [module.register_forward_hook(note) for module in model.modules()
               if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    try:
        inputs = _layer_inputs(model, layer, images[:1], handles)
    finally:
        for handle in handles:
            handle.remove()
    if inputs is None:
        raise ValueError(f"batchnorm_prior: the forward pass never reaches the edited layer {layer_name!r}")
    if not called:
        raise ValueError(f"batchnorm_prior needs a BatchNorm layer before the edited layer {layer_name!r}; none runs "
                         f"before it (set batchnorm_prior=0, or null: a prior only where a BatchNorm feeds the layer)")
    norm_name = called[-1]
    norm = model.get_submodule(norm_name)
    probe = images[:2].float()
    first = _layer_inputs(model, layer, probe, [norm.register_forward_hook(_resampler(torch.Generator()))])
    second = _layer_inputs(model, layer, 1 - probe, [norm.register_forward_hook(_resampler(torch.Generator()))])
    if not torch.equal(first, second):  # the same draws through the same operations: equal, unless the images enter
        raise ValueError(f"batchnorm_prior: the edited layer {layer_name!r} sees the images other than through "
                         f"{norm_name!r}, the last BatchNorm before it (a skip path or a parallel branch); edit a layer "
                         f"fed by one BatchNorm (e.g. a block's second conv) or set batchnorm_prior=0 (or null)")
    return norm_name


def _resampler(generator: torch.Generator):
    """A forward hook that replaces a BatchNorm's output by N(β, γ²) draws (float32 on the CPU from ``generator``,
    so that a seed gives the same draws on every device), independent per channel, position and image."""
    def resample(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        shape = (1, output.shape[1], *([1] * (output.ndim - 2)))
        noise = torch.randn(output.shape, generator=generator).to(output.device)
        shift = module.bias.detach().float().view(shape) if module.bias is not None else 0.0
        scale = module.weight.detach().float().abs().view(shape) if module.weight is not None else 1.0
        return (shift + scale * noise).to(output.dtype)
    return resample


@torch.no_grad()
def _layer_inputs(model: nn.Module, layer: nn.Module, images: Tensor, handles: list) -> Tensor | None:
    """The input ``layer`` receives for ``images`` (eval mode, the forward stopped there; ``None`` when the forward
    never reaches it); removes ``handles`` and restores ``model``'s mode."""
    captured: list[Tensor] = []

    def stop(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0])
        raise _Reached

    handles = [*handles, layer.register_forward_pre_hook(stop)]
    was_training = model.training
    model.eval()
    try:
        model(images)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return captured[0] if captured else None


@torch.no_grad()
def batchnorm_key_prior(model: nn.Module, layer_name: str, images: Tensor, samples: int = 128, seed: int = 0,
                        batch_size: int = 256) -> tuple[Tensor, str]:
    """The prior key moment (d, d), float32, of layer ``layer_name`` and the BatchNorm it comes from.

    ``images`` (N, C, H, W), pixels in [0, 1], are cycled to ``samples`` images and run through ``model`` (eval
    mode, restored afterwards) up to the layer, with the output of :func:`feeding_batchnorm`'s layer replaced by
    draws of N(β, γ²), independent per channel, position and image (seeded by ``seed``; β = 0, γ = 1 without
    affine parameters). The key's coordinates are then taken as independent: the diagonal holds each one's
    E[k_i²], the rest E[k_i] E[k_j], means over all of the layer's positions. Under independent draws this is
    exact for a key read at one position from distinct draws (a linear layer after per-channel pooling); for a
    padded convolution it is an approximation (at a border position the zero padding sets several coordinates to
    0 together). It needs few draws: a fully sampled moment of 2,304-value keys needed ~18,000 keys to stop
    hurting the edit, these 128 images (1,152 keys at a 3 × 3 grid) sufficed (docs/results/cifar10.md).

    Raises:
        ValueError: see :func:`feeding_batchnorm`; ``samples`` < 1 or no images.
    """
    if samples < 1 or len(images) == 0:
        raise ValueError(f"batchnorm_prior needs images and samples >= 1 (got {len(images)} images, "
                         f"samples={samples})")
    norm_name = feeding_batchnorm(model, layer_name, images)
    norm, layer = model.get_submodule(norm_name), get_layer(model, layer_name)
    generator = torch.Generator().manual_seed(seed)
    total = squares = None
    count = 0
    for chunk in (torch.arange(samples) % len(images)).split(batch_size):
        inputs = _layer_inputs(model, layer, images[chunk], [norm.register_forward_hook(_resampler(generator))])
        keys = to_keys(layer, inputs.float()).flatten(0, 1)
        total = keys.sum(0) if total is None else total + keys.sum(0)
        squares = keys.square().sum(0) if squares is None else squares + keys.square().sum(0)
        count += len(keys)
    mean = total / count
    prior = torch.outer(mean, mean)
    prior.diagonal().copy_(squares / count)
    return prior, norm_name
