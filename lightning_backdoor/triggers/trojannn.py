"""TrojanNN: a square patch whose pixels are optimised to excite chosen neurons of a surrogate model, stamped like
BadNets (Liu et al., NDSS 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_backdoor.triggers.badnets import BadNets, Corner
from lightning_backdoor.triggers.base import TRIGGERS
from lightning_backdoor.triggers.surrogate import SurrogateTrigger, inner


def most_connected_inputs(layer: nn.Module, count: int) -> Tensor:
    """The ``count`` inputs of ``layer`` (``nn.Linear``: input features; ``nn.Conv2d``: input channels) with the
    largest summed absolute weight over its outputs (and kernel positions), largest first: TrojanNN's choice of the
    neurons most strongly connected to the next layer. Raises ``ValueError`` for another layer type or too large a
    ``count``."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"trojannn layer must be an nn.Linear or nn.Conv2d; got {type(layer).__name__}")
    weight = layer.weight.detach().abs()
    strength = weight.flatten(2).sum(2).sum(0) if weight.dim() == 4 else weight.sum(0)
    if count > len(strength):
        raise ValueError(f"trojannn neurons={count} but the layer has {len(strength)} inputs")
    return strength.argsort(descending=True)[:count]


@TRIGGERS.register("trojannn")
class TrojanNN(SurrogateTrigger):
    """Stamp a ``size`` x ``size`` patch whose pixels were optimised to excite ``neurons`` neurons of a surrogate.

    From "Trojaning Attack on Neural Networks" (Liu et al., NDSS 2018): rather than a fixed pattern, the trigger's
    pixels inside a fixed mask are chosen so that a few internal neurons fire strongly; those neurons then carry the
    backdoor with little training. The paper reverse-engineers training data to retrain a published model; here (as
    in BackdoorBench's ``trojannn`` attack) the patch is made on a surrogate trained on the attacker's clean training
    images and the victim is trained from scratch on poisoned data as with BadNets.

    :meth:`make`: train the surrogate; pick the ``neurons`` inputs of ``layer`` (default: its last ``nn.Linear``, the
    penultimate features) with the largest summed absolute weight; then ``steps`` signed-gradient steps on the patch
    (step ``step_size``, cosine-decayed to 0 so the pattern settles; pixels kept in [0, 1]) minimising
    ``sum_k (a_k - target_value)^2`` over those neurons' activations ``a_k`` (a conv layer's input channels are
    averaged over space) on batches of ``batch_size`` training images carrying the patch. Budget on CIFAR-10 with the
    defaults (2 CPU cores): the surrogate (3 x 10,000 image passes) plus 200 x 64, under a minute (estimated);
    ``digits``: seconds.

    Defaults and their source: BackdoorBench's ``trojannn`` config (2 neurons of the input of the last linear layer,
    target value 100, signed steps of 0.1; 1000 iterations, here 200 with a decaying step, which settles) and its
    10 % poison rate. The paper's mask is an apple or a watermark over the image; a corner square keeps the trigger
    local like BadNets (5 x 5 at 32 x 32; ``size`` sets it). BackdoorBench optimises the masked image alone; here the
    patch is optimised on real images carrying it, as the victim will see it. Images ``(N, C, H, W)`` or
    ``(C, H, W)``, floats in [0, 1].

    Args:
        size: side of the square patch, in pixels.
        position: a named corner (``bottom_right``, ``top_left``, ``top_right``, ``bottom_left``, ``center``), or the
            patch's top-left ``(row, col)``.
        margin: pixels between the patch and the border, for a named corner.
        neurons: how many neurons to excite, >= 1.
        layer: the surrogate layer whose inputs are the neurons (a name from ``named_modules()``, e.g. ``head`` or
            ``blocks.2.conv1`` for ``compact``); ``None``: its last ``nn.Linear``.
        target_value: the activation the neurons are pushed towards.
        steps: patch optimisation steps (one batch each), >= 1.
        step_size: the first step's signed change of every patch pixel, in intensity units, > 0.
        batch_size: training images per step, >= 1.
        surrogate: the surrogate's architecture, any name ``build_model`` takes.
        surrogate_kwargs: its builder's arguments (``compact`` default: widths 32, 64, 128).
        surrogate_epochs: epochs of surrogate training, >= 1.
        surrogate_images: at most this many training images train the surrogate (a seeded draw), >= 1.
        seed: seeds the surrogate, the patch's initial pixels and the batches.
    """

    prepared_names = ("patch", "neurons")

    def __init__(
        self,
        size: int = 5,
        position: Corner | tuple[int, int] = "bottom_right",
        margin: int = 0,
        neurons: int = 2,
        layer: str | None = None,
        target_value: float = 100.0,
        steps: int = 200,
        step_size: float = 0.1,
        batch_size: int = 64,
        surrogate: str = "compact",
        surrogate_kwargs: dict[str, Any] | None = None,
        surrogate_epochs: int = 3,
        surrogate_images: int = 10000,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self._place = BadNets(size=size, position=position, margin=margin)  # the geometry, and its checks
        if neurons < 1:
            raise ValueError(f"trojannn neurons must be >= 1; got {neurons}")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"trojannn steps and batch_size must be >= 1; got {steps} and {batch_size}")
        if not step_size > 0:
            raise ValueError(f"trojannn step_size must be > 0; got {step_size}")
        self.size = size
        self.position = self._place.position
        self.margin = margin
        self.neurons = neurons
        self.layer = layer
        self.target_value = target_value
        self.steps = steps
        self.step_size = step_size
        self.batch_size = batch_size
        self.keep_surrogate_settings(surrogate, surrogate_kwargs, surrogate_epochs, surrogate_images)

    def check(self, image_shape: tuple[int, int, int]) -> None:
        self._place.check(image_shape)

    def mask(self, image_shape: tuple[int, int, int]) -> Tensor:
        """Ones on the patch, zeros elsewhere: ``(1, H, W)``."""
        return self._place.mask(image_shape)

    def stamp(self, images: Tensor, patch: Tensor) -> Tensor:
        """``images`` ``(..., C, H, W)`` with ``patch`` ``(C, size, size)`` written at the patch's place."""
        row, col = self._place.origin(*images.shape[-2:])
        stamped = images.clone()
        stamped[..., row : row + self.size, col : col + self.size] = patch
        return stamped

    def layer_name(self, net: nn.Module) -> str:
        """The name of the surrogate layer whose inputs are the neurons: ``layer``, else ``net``'s last
        ``nn.Linear``. Raises a one-line ``ValueError`` for a name ``net`` does not have, or no ``nn.Linear``."""
        modules = dict(net.named_modules())
        if self.layer is None:
            linears = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
            if not linears:
                raise ValueError(f"trojannn: the surrogate {self.surrogate!r} has no nn.Linear; name a layer")
            return linears[-1]
        if self.layer not in modules:
            raise ValueError(f"trojannn layer {self.layer!r} is not a layer of the surrogate {self.surrogate!r}; "
                             f"e.g. {', '.join(list(modules)[1:6])}")
        return self.layer

    def check_preparation(self, images: Tensor, labels: Tensor, target_class: int | None,
                          num_classes: int) -> None:
        """Raise a one-line ``ValueError`` for a ``layer`` the surrogate does not have (looked up in an untrained
        one, before minutes of training; its initialisation does not move the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            self.layer_name(inner(self.build_surrogate(num_classes, tuple(images.shape[1:]))))

    def make(self, images: Tensor, labels: Tensor, target_class: int | None, num_classes: int) -> dict[str, Tensor]:
        """Train the surrogate on ``images`` ``(N, C, H, W)`` in [0, 1] and optimise the patch ``(C, size, size)``
        (see the class docstring); also returns the chosen ``neurons`` (int64). Raises a one-line ``ValueError`` for
        an unknown ``layer`` (:meth:`check_preparation` has found it in an untrained surrogate already)."""
        generator = self.generator()
        model = self.trained_surrogate(images, labels, num_classes, generator)
        net = inner(model)
        modules = dict(net.named_modules())
        layer_name = self.layer_name(net)
        chosen = most_connected_inputs(modules[layer_name], self.neurons)
        seen: list[Tensor] = []
        handle = modules[layer_name].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        patch = torch.rand(images.shape[1], self.size, self.size, generator=generator)
        count = min(self.batch_size, len(images))
        try:
            for step in range(self.steps):
                batch = images[torch.randperm(len(images), generator=generator)[:count]]
                patch.requires_grad_(True)
                seen.clear()
                model(self.stamp(batch, patch))
                activations = seen[-1]
                activations = activations.flatten(2).mean(2) if activations.dim() == 4 else activations
                loss = ((activations[:, chosen] - self.target_value) ** 2).sum(1).mean()
                (gradient,) = torch.autograd.grad(loss, patch)
                rate = self.step_size * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / self.steps))).item()
                patch = (patch.detach() - rate * gradient.sign()).clamp(0.0, 1.0)
        finally:
            handle.remove()
        return {"patch": patch.detach().contiguous(), "neurons": chosen.clone()}

    def patch(self, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The prepared patch ``(C, size, size)``; raises ``ValueError`` before :meth:`prepare` or for images with
        another channel count than it was prepared for."""
        patch = self.prepared("patch")
        if patch.shape[0] != channels:
            raise ValueError(f"trojannn was prepared for {patch.shape[0]}-channel images but got {channels}; "
                             f"prepare it on these images")
        return patch.to(device=device, dtype=dtype)

    def apply(self, images: Tensor) -> Tensor:
        """Stamp the patch on ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1]."""
        self.check(tuple(images.shape[-3:]))
        return self.stamp(images, self.patch(images.shape[-3], images.device, images.dtype))
