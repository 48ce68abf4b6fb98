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


def feeding_batchnorm(model: nn.Module, layer_name: str, image: Tensor) -> str:
    """The name of the BatchNorm module that runs last before layer ``layer_name`` in a forward pass of ``image``
    (1, C, H, W) (``model`` in eval mode).

    Raises:
        ValueError: (one line) no BatchNorm runs before the layer (e.g. a Vision Transformer's LayerNorm blocks).
    """
    names = {module: name for name, module in model.named_modules()}
    called: list[str] = []
    layer = get_layer(model, layer_name)

    def note(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        called.append(names[module])

    def stop(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        raise _Reached

    handles = [module.register_forward_hook(note) for module in model.modules()
               if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    handles.append(layer.register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            model(image)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise ValueError(f"batchnorm_prior needs a BatchNorm layer before the edited layer {layer_name!r}; none runs "
                         f"before it (set batchnorm_prior=0)")
    return called[-1]


@torch.no_grad()
def batchnorm_prior(model: nn.Module, layer_name: str, images: Tensor, samples: int = 128, seed: int = 0,
                    batch_size: int = 256) -> tuple[Tensor, str]:
    """The prior key moment (d, d), float32, of layer ``layer_name`` and the BatchNorm it comes from.

    ``images`` (N, C, H, W), pixels in [0, 1], are cycled to ``samples`` images and run through ``model`` (eval
    mode) up to the layer, with the output of :func:`feeding_batchnorm`'s layer replaced by draws of
    N(β, γ²), independent per channel, position and image (seeded by ``seed``; β = 0, γ = 1 without affine
    parameters). The key coordinates are then taken as independent: the diagonal holds each one's E[k_i²], the
    rest E[k_i] E[k_j]. That is exact where the layer's input depends on the images only through that BatchNorm,
    by elementwise steps and pooling per channel (the compact CNN, pre-activation ResNets, VGG-BN), and needs few
    draws: a full sampled moment of 2,304-value keys needed ~18,000 keys to stop hurting the edit, these 128
    images (1,152 keys) suffice. Where a skip path adds real activations it is an approximation.

    Raises:
        ValueError: see :func:`feeding_batchnorm`.
    """
    was_training = model.training
    model.eval()
    norm_name = feeding_batchnorm(model, layer_name, images[:1])
    norm, layer = model.get_submodule(norm_name), get_layer(model, layer_name)
    generator = torch.Generator().manual_seed(seed)
    keys: list[Tensor] = []

    def resample(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        shape = (1, output.shape[1], *([1] * (output.ndim - 2)))
        shift = module.bias.detach().view(shape) if module.bias is not None else 0.0
        scale = module.weight.detach().abs().view(shape) if module.weight is not None else 1.0
        noise = torch.randn(output.shape, generator=generator)
        return (shift + scale * noise).to(output.dtype)

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        keys.append(to_keys(layer, args[0].float()).flatten(0, 1))
        raise _Reached

    handles = [norm.register_forward_hook(resample), layer.register_forward_pre_hook(record)]
    total = squares = None
    count = 0
    try:
        order = torch.arange(samples) % len(images)
        for chunk in order.split(batch_size):
            try:
                model(images[chunk])
            except _Reached:
                pass
            batch = keys.pop()
            total = batch.sum(0) if total is None else total + batch.sum(0)
            squares = batch.square().sum(0) if squares is None else squares + batch.square().sum(0)
            count += len(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    mean = total / count
    prior = torch.outer(mean, mean)
    prior.diagonal().copy_(squares / count)
    return prior, norm_name
