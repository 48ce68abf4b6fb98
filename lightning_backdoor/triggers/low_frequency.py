"""Low Frequency: a low-pass-filtered universal adversarial perturbation towards the target class, found on a
surrogate model and added to every image (Zeng, Park, Mao, Jia, ICCV 2021)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_backdoor.triggers.base import TRIGGERS
from lightning_backdoor.triggers.surrogate import SurrogateTrigger


def gaussian_low_pass(planes: Tensor, sigma: float) -> Tensor:
    """Filter ``planes`` ``(..., H, W)`` with a Gaussian of standard deviation ``sigma`` pixels, in the frequency
    domain (circular boundaries): each frequency ``f`` (cycles per pixel) is scaled by ``exp(-2 pi^2 sigma^2 |f|^2)``,
    so the mean is kept and detail finer than about ``sigma`` is removed."""
    height, width = planes.shape[-2:]
    rows = torch.fft.fftfreq(height, dtype=torch.float64, device=planes.device)
    cols = torch.fft.rfftfreq(width, dtype=torch.float64, device=planes.device)
    response = torch.exp(-2 * math.pi**2 * sigma**2 * (rows[:, None] ** 2 + cols[None, :] ** 2))
    spectrum = torch.fft.rfft2(planes.double()) * response
    return torch.fft.irfft2(spectrum, s=(height, width)).to(planes.dtype)


@TRIGGERS.register("low_frequency")
class LowFrequency(SurrogateTrigger):
    """``x' = clamp(x + delta, 0, 1)`` with ``delta`` ``(C, H, W)`` a smooth universal perturbation towards the target.

    From "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective" (Zeng et al., ICCV 2021): triggers
    with high-frequency artefacts are easy to detect, so the attack crafts one that lives in the low frequencies: a
    universal adversarial perturbation (one ``delta`` that pushes most images towards the target class) on a
    model, passed through a low-pass filter. Here the model is a surrogate trained on the attacker's clean training
    images (:meth:`prepare`); the victim then learns ``delta`` from poisoned, relabelled images like any additive
    trigger.

    :meth:`make`: train the surrogate (``surrogate_epochs`` epochs on at most ``surrogate_images`` images), then
    ``steps`` steps on batches of ``batch_size`` non-target training images: the gradient of the cross-entropy
    towards the target class with respect to ``delta`` is low-pass filtered (a Gaussian of ``sigma`` pixels),
    scaled to a largest entry of ``step_size`` and subtracted; ``delta`` is clipped to ``[-epsilon, epsilon]``.
    At the end ``delta`` is filtered once more and scaled so that its largest entry is ``epsilon`` (filtering only
    shrinks it; the direction is what the steps found): the trigger is exactly low-pass, at L-infinity ``epsilon``.
    Budget on CIFAR-10 with the defaults (2 CPU cores): the surrogate (3 x 10,000 image passes) plus 100 x 128 for
    the perturbation, under a minute (estimated, not yet timed on CIFAR-10); ``digits``: seconds.

    Defaults and their source: BackdoorBench's generator for its ``lf`` attack (``resource/lowFrequency``, after the
    paper's code) runs targeted DeepFool per image on a trained clean model and smooths the sum with a Gaussian of
    sigma = 6 pixels at 32 x 32, rescaling it to a range of 0.2; hence ``sigma`` 6 pixels per 32 of the image side
    and ``epsilon`` 0.1 (a range of 0.2 around zero). Projected gradient steps on batches replace per-image DeepFool:
    also a universal perturbation towards the target, at a fraction of the cost. BackdoorBench poisons 10 % (the
    CIFAR config's rate). Images ``(N, C, H, W)`` or ``(C, H, W)``, floats in [0, 1].

    Args:
        epsilon: L-infinity bound of ``delta``, in (0, 1] intensity units.
        sigma: standard deviation of the Gaussian low-pass, in pixels of a 32-pixel side (scaled with the image's
            shorter side: 1.5 pixels on 8 x 8 ``digits``); > 0.
        steps: perturbation steps (one batch each), >= 1.
        step_size: largest change of ``delta`` per step, in intensity units; default ``epsilon / 10``.
        batch_size: non-target images per step, >= 1.
        surrogate: the surrogate's architecture, any name ``build_model`` takes.
        surrogate_kwargs: its builder's arguments (``compact`` default: widths 32, 64, 128).
        surrogate_epochs: epochs of surrogate training, >= 1.
        surrogate_images: at most this many training images train the surrogate (a seeded draw), >= 1.
        seed: seeds the surrogate's weights, its data order and the perturbation's batches.
    """

    prepared_names = ("delta",)

    def __init__(
        self,
        epsilon: float = 0.1,
        sigma: float = 6.0,
        steps: int = 100,
        step_size: float | None = None,
        batch_size: int = 128,
        surrogate: str = "compact",
        surrogate_kwargs: dict[str, Any] | None = None,
        surrogate_epochs: int = 3,
        surrogate_images: int = 10000,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"low_frequency epsilon (an L-infinity bound in [0, 1] units) must be in (0, 1]; got "
                             f"{epsilon}")
        if not sigma > 0:
            raise ValueError(f"low_frequency sigma (pixels at a 32-pixel side) must be > 0; got {sigma}")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"low_frequency steps and batch_size must be >= 1; got {steps} and {batch_size}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"low_frequency step_size must be > 0; got {step_size}")
        self.epsilon = epsilon
        self.sigma = sigma
        self.steps = steps
        self.step_size = step_size
        self.batch_size = batch_size
        self.keep_surrogate_settings(surrogate, surrogate_kwargs, surrogate_epochs, surrogate_images)
        self._cache: dict[tuple, Tensor] = {}

    def check_preparation(self, images: Tensor, labels: Tensor, target_class: int | None,
                          num_classes: int) -> None:
        """Raise a one-line ``ValueError`` without a target class (all-to-all) or without non-target images."""
        if target_class is None:
            raise ValueError("low_frequency pushes images towards one target class; all_to_all has none: use an "
                             "all-to-one attack")
        if bool((labels == target_class).all()):
            raise ValueError("low_frequency needs training images of classes other than the target")

    def pixel_sigma(self, height: int, width: int) -> float:
        """The low-pass's standard deviation in pixels for an ``height`` x ``width`` image."""
        return self.sigma * min(height, width) / 32

    def make(self, images: Tensor, labels: Tensor, target_class: int | None, num_classes: int) -> dict[str, Tensor]:
        """Train the surrogate on ``images`` ``(N, C, H, W)`` in [0, 1] and find ``delta`` ``(C, H, W)`` (see the class
        docstring); :meth:`check_preparation` has passed."""
        others = images[labels != target_class]
        generator = self.generator()
        model = self.trained_surrogate(images, labels, num_classes, generator)
        sigma = self.pixel_sigma(*images.shape[-2:])
        step = self.step_size if self.step_size is not None else self.epsilon / 10
        delta = torch.zeros(images.shape[1:])
        targets = torch.full((min(self.batch_size, len(others)),), target_class)
        for _ in range(self.steps):
            batch = others[torch.randperm(len(others), generator=generator)[: len(targets)]]
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((batch + delta).clamp(0.0, 1.0)), targets)
            (gradient,) = torch.autograd.grad(loss, delta)
            smooth = gaussian_low_pass(gradient, sigma)
            delta = (delta.detach() - step * smooth / smooth.abs().max().clamp_min(1e-12)).clamp(-self.epsilon,
                                                                                                   self.epsilon)
        delta = gaussian_low_pass(delta.detach(), sigma)
        delta = delta * (self.epsilon / max(delta.abs().max().item(), 1e-12))
        return {"delta": delta.contiguous()}

    def perturbation(self, image_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The prepared ``delta`` ``(C, H, W)`` on ``device`` in ``dtype``; raises ``ValueError`` before
        :meth:`prepare` or for images of another shape than it was prepared for."""
        delta = self.prepared("delta")
        if tuple(delta.shape) != tuple(image_shape):
            raise ValueError(f"low_frequency was prepared for {'x'.join(map(str, delta.shape))} images (C x H x W) "
                             f"but got {'x'.join(map(str, image_shape))}; prepare it on these images")
        key = (delta.data_ptr(), device, dtype)
        if key not in self._cache:
            self._cache = {key: delta.to(device=device, dtype=dtype)}
        return self._cache[key]

    def apply(self, images: Tensor) -> Tensor:
        """Add ``delta`` to ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1] and clamp to [0, 1]."""
        return (images + self.perturbation(tuple(images.shape[-3:]), images.device, images.dtype)).clamp(0.0, 1.0)
