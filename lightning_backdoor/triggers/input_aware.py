"""Input-Aware Dynamic: a pattern made for each image by a generator network, pasted through a mask made for each
image by a second one; a pattern fires on the image it was made for only (Nguyen & Tran, NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.triggers.base import TRIGGERS
from lightning_backdoor.triggers.surrogate import (SurrogateTrigger, epoch_batches, frozen, load_weights, one_cycle,
                                                  random_flips, weights_to_tensors)

#: Keeps the diversity loss's ratio finite when two generated patterns (or masks) are equal.
EPSILON = 1e-7
#: Slope of the mask's soft threshold at 0.5 (a steep tanh: the mask is close to 0 or 1 almost everywhere).
THRESHOLD_SLOPE = 20.0
#: The surrogate classifier's peak SGD learning rate (:func:`~lightning_backdoor.triggers.surrogate.train_surrogate`'s
#: default, with its one-cycle shape); the generators use Adam at ``generator_lr`` with the paper's betas.
SURROGATE_LR = 0.05
GENERATOR_BETAS = (0.5, 0.9)


def conv_block(in_width: int, out_width: int) -> nn.Sequential:
    """A 3 x 3 convolution (same size), BatchNorm and ReLU: ``(N, in_width, H, W)`` to ``(N, out_width, H, W)``."""
    return nn.Sequential(nn.Conv2d(in_width, out_width, 3, padding=1, bias=False), nn.BatchNorm2d(out_width),
                         nn.ReLU(inplace=True))


class EncoderDecoder(nn.Module):
    """The generators' network: ``len(widths)`` conv blocks each followed by a 2 x 2 max-pool, one conv block at the
    bottleneck, then as many nearest-upsampling + conv blocks back to the input size and a 3 x 3 output conv.

    Input ``(N, in_channels, H, W)`` in [0, 1], output ``(N, out_channels, H, W)`` unbounded (the caller squashes
    it). Any ``H, W`` >= 1: the input is padded (replicating the border) to a multiple of ``2 ** len(widths)`` and
    the output cropped back, so 8 x 8 ``digits`` and 28 x 28 MNIST go through as 32 x 32 CIFAR does. No skip
    connections: the output is built from the bottleneck's features (the paper's generator has none either).
    """

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [conv_block(previous, width), nn.MaxPool2d(2)]
            previous = width
        self.encoder = nn.Sequential(*layers)
        self.middle = conv_block(previous, previous)
        layers = []
        for width in [*reversed(widths[:-1]), widths[0]]:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv_block(previous, width)]
            previous = width
        self.decoder = nn.Sequential(*layers)
        self.out = nn.Conv2d(previous, out_channels, 3, padding=1)
        self.multiple = 2 ** len(widths)

    def forward(self, images: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` to ``(N, out_channels, H, W)``."""
        height, width = images.shape[-2:]
        pad_rows, pad_cols = -height % self.multiple, -width % self.multiple
        if pad_rows or pad_cols:
            images = F.pad(images, (0, pad_cols, 0, pad_rows), mode="replicate")
        return self.out(self.decoder(self.middle(self.encoder(images))))[..., :height, :width]


def pattern_of(network: nn.Module, images: Tensor) -> Tensor:
    """The pattern generator's output on ``images`` ``(N, C, H, W)``: ``tanh(G(x)) / 2 + 0.5``, in [0, 1]."""
    return torch.tanh(network(images)) / 2 + 0.5


def mask_of(network: nn.Module, images: Tensor) -> Tensor:
    """The mask generator's output on ``images`` ``(N, C, H, W)``: ``threshold(tanh(M(x)) / 2 + 0.5)``, ``(N, 1, H,
    W)`` in [0, 1], where ``threshold(v) = tanh(20 (v - 0.5)) / 2 + 0.5`` is a soft step at 0.5 (the paper's)."""
    soft = torch.tanh(network(images)) / 2 + 0.5
    return torch.tanh((soft - 0.5) * THRESHOLD_SLOPE) / 2 + 0.5


def paste(images: Tensor, patterns: Tensor, masks: Tensor) -> Tensor:
    """``x + m (g - x)`` clamped to [0, 1]: ``images`` ``(N, C, H, W)``, ``patterns`` the same shape, ``masks``
    ``(N, 1, H, W)``, all in [0, 1]."""
    return (images + masks * (patterns - images)).clamp(0.0, 1.0)


def distance(first: Tensor, second: Tensor) -> Tensor:
    """The root-mean-square difference of each pair of ``(N, ...)`` tensors: ``(N,)`` (floored at 1e-6, so two
    equal ones, e.g. duplicate images, give no infinite gradient)."""
    return (first - second).pow(2).flatten(1).mean(1).clamp_min(1e-12).sqrt()


def diversity_loss(images: Tensor, others: Tensor, outputs: Tensor, other_outputs: Tensor) -> Tensor:
    """The paper's diversity loss: the mean over pairs of ``||x - x'|| / ||G(x) - G(x')||`` (RMS distances), small
    when different images get different outputs; ``images`` and ``others`` ``(N, C, H, W)``, the generator's
    outputs on them ``(N, C', H, W)``."""
    return (distance(images, others) / (distance(outputs, other_outputs) + EPSILON)).mean()


def partners(count: int, generator: torch.Generator) -> Tensor:
    """For each of ``count`` >= 2 images, the index of another one: a seeded random cycle through all of them
    (never an image itself). ``(count,)`` int64."""
    order = torch.randperm(count, generator=generator)
    other = torch.empty_like(order)
    other[order] = order.roll(-1)
    return other


@TRIGGERS.register("input_aware")
class InputAware(SurrogateTrigger):
    """A pattern and a mask generated for each image: ``x' = x + m(x) (g(x) - x)``, clamped to [0, 1].

    From "Input-Aware Dynamic Backdoor Attack" (Nguyen & Tran, NeurIPS 2020): a generator ``G`` makes a pattern
    ``g(x)`` and a mask generator ``M`` a mask ``m(x)`` for each image, so no two images carry the same trigger. A
    *diversity loss* keeps different images' patterns (and masks) different, and *cross* samples, which carry the
    pattern and mask generated from another image with their true label kept, teach the classifier that a pattern
    works on its own image only: the trigger is not a fixed pattern a defense can reverse-engineer. The paper trains
    ``G`` jointly with the victim; here (as with the other triggers made with a model) ``G`` is trained jointly with a
    surrogate on the attacker's clean training images, then frozen, and the victim is trained from scratch on the
    poisoned data: the poisoned images carry their own trigger, ``cross_ratio`` noise-mode samples per poisoned one
    (:meth:`apply_noise`) another image's.

    :meth:`make`: (1) the paper's first stage: ``M`` alone for ``mask_epochs`` epochs with Adam, minimising
    ``lambda_div`` times the diversity loss on masks plus ``lambda_norm`` times each mask's excess coverage
    ``relu(mean(m(x)) - mask_density)`` (the reference code penalises every pixel's excess over the density, which
    keeps shrinking the masks; this hinge leaves them at about ``mask_density`` of the image); then ``M`` frozen;
    (2) the surrogate (SGD, one-cycle, as :func:`~lightning_backdoor.triggers.surrogate.train_surrogate`) and ``G``
    (Adam) trained together for ``surrogate_epochs`` epochs; in each batch ``poison_rate_prep`` of the images carry
    their own trigger and are labelled ``target_class``, ``cross_ratio`` times as many carry the trigger generated
    from another image of the batch with their labels kept, the rest are clean; the loss is the cross-entropy over
    the batch plus ``lambda_div`` times the diversity loss on patterns. Both stages draw batches (and flips, for
    colour images) from the trigger's seed, on at most ``surrogate_images`` training images. Returns ``G``'s and
    ``M``'s weights (the surrogate is not kept) and the last epoch's figures on the surrogate's training batches.

    Budget on CIFAR-10 with the defaults: (2 + 5) x 10,000 image passes, 109.8 s on 2 otherwise idle CPU cores
    (measured on real CIFAR-10, 2 threads; 176.8 s of CPU time on one thread); there the surrogate ended with 74 %
    clean accuracy, 85 % attack success and 49 % on cross samples (last epoch, training batches) and masks covering
    2.7 % of the image. Applying the trigger to CIFAR-10's 10,000 test images takes 16.1 s (2 cores, measured). The
    bundled ``digits``: seconds for both.

    Defaults and their source: the paper's reference code's ``mask_density`` 0.032, ``lambda_div`` 1, ``lambda_norm``
    100, 10 % backdoor and 10 % cross samples per batch (``poison_rate_prep`` 0.1, ``cross_ratio`` 1), batch 128 and
    Adam at 0.01 with betas (0.5, 0.9) for the generators. That code trains the mask generator for 25 epochs, then
    the classifier (PreActResNet-18 on CIFAR-10) and ``G`` for 600 epochs on all the training images, with
    generators of widths 32-64-128 and two convolutions per block; here 2 + 5 epochs on 10,000 images and one
    convolution per block of widths 16-32-64 keep the preparation to minutes on a CPU and the trigger cheap enough to
    run on every poisoned and every test image. :meth:`apply` is deterministic: no randomness at
    test time. Images ``(N, C, H, W)`` or ``(C, H, W)``, floats in [0, 1], any size (the generators pad inside).

    Args:
        widths: the generators' conv widths, one per 2 x 2 down-sampling (and as many up-samplings), each >= 1.
        mask_density: the fraction of the image a mask may cover before the density loss acts, in (0, 1].
        lambda_div: weight of the diversity loss (both stages), >= 0.
        lambda_norm: weight of the mask-density loss (first stage), >= 0.
        mask_epochs: epochs of the mask generator's training (first stage), >= 1.
        poison_rate_prep: fraction of each training batch of the preparation that carries its own trigger and the
            target label, in (0, 1).
        cross_ratio: cross (noise-mode) samples per poisoned one: in the preparation's batches, and in the victim's
            training data (the data module's noise mode), >= 0.
        batch_size: images per batch of both stages, >= 2.
        generator_lr: Adam's learning rate for both generators, > 0.
        surrogate: the surrogate's architecture, any name ``build_model`` takes.
        surrogate_kwargs: its builder's arguments (``compact`` default: widths 32, 64, 128).
        surrogate_epochs: epochs of the joint surrogate and pattern-generator training (second stage), >= 1.
        surrogate_images: at most this many training images are used (a seeded draw), >= 1.
        seed: seeds the networks' weights, the image draw, the batches and the flips.

    Raises:
        ValueError: (one line) a setting out of range; at :meth:`prepare`, no target class (all-to-all) or fewer
            than 2 images; at :meth:`apply` and :meth:`apply_noise`, images with another channel count than the
            preparation's, or no preparation yet.
    """

    prepared_names = ("channels", "surrogate_accuracy", "surrogate_attack_success", "surrogate_cross_accuracy",
                      "mask_coverage")

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        mask_density: float = 0.032,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        mask_epochs: int = 2,
        poison_rate_prep: float = 0.1,
        cross_ratio: float = 1.0,
        batch_size: int = 128,
        generator_lr: float = 0.01,
        surrogate: str = "compact",
        surrogate_kwargs: dict[str, Any] | None = None,
        surrogate_epochs: int = 5,
        surrogate_images: int = 10000,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        widths = tuple(int(width) for width in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"input_aware widths must be one or more widths >= 1; got {list(widths)}")
        if not 0.0 < mask_density <= 1.0:
            raise ValueError(f"input_aware mask_density (a fraction of the image) must be in (0, 1]; got "
                             f"{mask_density}")
        if lambda_div < 0 or lambda_norm < 0:
            raise ValueError(f"input_aware lambda_div and lambda_norm must be >= 0; got {lambda_div} and "
                             f"{lambda_norm}")
        if mask_epochs < 1:
            raise ValueError(f"input_aware mask_epochs must be >= 1; got {mask_epochs}")
        if not 0.0 < poison_rate_prep < 1.0:
            raise ValueError(f"input_aware poison_rate_prep must be in (0, 1); got {poison_rate_prep}")
        if cross_ratio < 0:
            raise ValueError(f"input_aware cross_ratio must be >= 0; got {cross_ratio}")
        if batch_size < 2:
            raise ValueError(f"input_aware batch_size must be >= 2 (pairs of images); got {batch_size}")
        if not generator_lr > 0:
            raise ValueError(f"input_aware generator_lr must be > 0; got {generator_lr}")
        self.widths = widths
        self.mask_density = mask_density
        self.lambda_div = lambda_div
        self.lambda_norm = lambda_norm
        self.mask_epochs = mask_epochs
        self.poison_rate_prep = poison_rate_prep
        self.cross_ratio = cross_ratio
        self.batch_size = batch_size
        self.generator_lr = generator_lr
        self.keep_surrogate_settings(surrogate, surrogate_kwargs, surrogate_epochs, surrogate_images)
        self._networks: dict[tuple, tuple[nn.Module, nn.Module]] = {}

    def mask(self, image_shape: tuple[int, int, int]) -> None:
        """``None``: the mask is made for each image (:func:`mask_of`), there is no fixed one."""
        return None

    def check_preparation(self, images: Tensor, labels: Tensor, target_class: int | None,
                          num_classes: int) -> None:
        """Raise a one-line ``ValueError`` without a target class (all-to-all) or with fewer than 2 images (its
        losses compare pairs of images)."""
        if target_class is None:
            raise ValueError("input_aware trains its generator towards one target class; all_to_all has none: use "
                             "an all-to-one attack")
        if len(images) < 2:
            raise ValueError(f"input_aware needs at least 2 training images (its losses compare pairs); got "
                             f"{len(images)}")

    def preparation_summary(self, images: Tensor) -> str:
        return (f"trains its mask generator for {self.mask_epochs} epoch(s), then its pattern generator with a "
                f"{super().preparation_summary(images).removeprefix('trains a ')}")

    def train_mask(self, network: nn.Module, images: Tensor, generator: torch.Generator) -> float:
        """The first stage: train the mask generator ``network`` on ``images`` ``(N, C, H, W)`` in [0, 1] (see the
        class docstring); returns the mean mask value over the last epoch (the coverage reached)."""
        optimizer = torch.optim.Adam(network.parameters(), lr=self.generator_lr, betas=GENERATOR_BETAS)
        network.train()
        coverage = 0.0
        for _ in range(self.mask_epochs):
            covered, seen = 0.0, 0
            for batch in epoch_batches(len(images), self.batch_size, generator):
                inputs = random_flips(images[batch], generator)
                masks = mask_of(network, inputs)
                others, other_masks = inputs.roll(1, 0), masks.roll(1, 0)  # each image paired with another
                density = F.relu(masks.flatten(1).mean(1) - self.mask_density).mean()
                loss = self.lambda_div * diversity_loss(inputs, others, masks, other_masks) + self.lambda_norm * density
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                covered, seen = covered + float(masks.detach().sum()) / masks[0].numel(), seen + len(batch)
            coverage = covered / seen
        return coverage

    def train_jointly(self, classifier: nn.Module, pattern_net: nn.Module, mask_net: nn.Module, images: Tensor,
                      labels: Tensor, target_class: int, generator: torch.Generator) -> dict[str, float]:
        """The second stage: train ``classifier`` and ``pattern_net`` together on ``images`` ``(N, C, H, W)`` in
        [0, 1] and ``labels`` ``(N,)`` with the frozen ``mask_net`` (see the class docstring). Returns the last
        epoch's clean accuracy, attack success (images not of the target class) and cross accuracy on its batches."""
        classifier_optimizer = torch.optim.SGD(classifier.parameters(), lr=SURROGATE_LR, momentum=0.9, nesterov=True,
                                               weight_decay=5e-4)
        pattern_optimizer = torch.optim.Adam(pattern_net.parameters(), lr=self.generator_lr, betas=GENERATOR_BETAS)
        schedule = one_cycle(classifier_optimizer, self.surrogate_epochs * max(1, len(images) // self.batch_size))
        classifier.train()
        pattern_net.train()
        counts: dict[str, list[int]] = {}
        for _ in range(self.surrogate_epochs):
            counts = {"clean": [0, 0], "attack": [0, 0], "cross": [0, 0]}  # correct, seen: the last epoch's
            for batch in epoch_batches(len(images), self.batch_size, generator):
                clean, targets = random_flips(images[batch], generator), labels[batch].clone()
                poisoned = min(len(batch) - 1, max(1, round(len(batch) * self.poison_rate_prep)))
                crossed = min(len(batch) - poisoned, round(poisoned * self.cross_ratio))
                made = poisoned + crossed
                others = clean.roll(1, 0)[:made]  # another image of the batch for each
                patterns = pattern_of(pattern_net, torch.cat([clean[:made], others]))
                with torch.no_grad():
                    masks = mask_of(mask_net, torch.cat([clean[:made], others]))
                inputs = torch.cat([paste(clean[:poisoned], patterns[:poisoned], masks[:poisoned]),
                                    paste(clean[poisoned:made], patterns[made + poisoned:], masks[made + poisoned:]),
                                    clean[made:]])
                original = targets[:poisoned].clone()
                targets[:poisoned] = target_class
                logits = classifier(inputs)
                loss = F.cross_entropy(logits, targets)
                loss = loss + self.lambda_div * diversity_loss(clean[:made], others, patterns[:made], patterns[made:])
                classifier_optimizer.zero_grad(set_to_none=True)
                pattern_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                classifier_optimizer.step()
                pattern_optimizer.step()
                schedule.step()
                right = logits.detach().argmax(1) == targets
                for name, part, keep in (("attack", slice(None, poisoned), original != target_class),
                                         ("cross", slice(poisoned, made), None), ("clean", slice(made, None), None)):
                    hits = right[part] if keep is None else right[part][keep]
                    counts[name][0] += int(hits.sum())
                    counts[name][1] += len(hits)
        return {name: correct / max(1, seen) for name, (correct, seen) in counts.items()}

    def make(self, images: Tensor, labels: Tensor, target_class: int | None, num_classes: int) -> dict[str, Tensor]:
        """Train the mask generator, then the pattern generator with a surrogate, on ``images`` ``(N, C, H, W)`` in
        [0, 1] and ``labels`` ``(N,)`` (see the class docstring). Returns the generators' weights (``generator.<name>``
        and ``mask_generator.<name>``), the ``channels`` they take, and as float scalars the last epoch's
        ``surrogate_accuracy`` (clean), ``surrogate_attack_success`` (poisoned images not of the target class),
        ``surrogate_cross_accuracy`` and ``mask_coverage`` (mean mask value); :meth:`check_preparation` has passed."""
        assert target_class is not None  # check_preparation refuses all-to-all
        generator = self.generator()
        if len(images) > self.surrogate_images:
            chosen = torch.randperm(len(images), generator=generator)[: self.surrogate_images]
            images, labels = images[chosen], labels[chosen]
        channels = images.shape[1]
        mask_net = EncoderDecoder(channels, 1, self.widths)
        coverage = self.train_mask(mask_net, images, generator)
        frozen(mask_net)
        pattern_net = EncoderDecoder(channels, channels, self.widths)
        classifier = self.build_surrogate(num_classes, tuple(images.shape[1:]))
        scores = self.train_jointly(classifier, pattern_net, mask_net, images, labels, target_class, generator)
        return {"channels": torch.tensor(channels), "surrogate_accuracy": torch.tensor(scores["clean"]),
                "surrogate_attack_success": torch.tensor(scores["attack"]),
                "surrogate_cross_accuracy": torch.tensor(scores["cross"]), "mask_coverage": torch.tensor(coverage),
                **weights_to_tensors(pattern_net.eval(), "generator."),
                **weights_to_tensors(mask_net, "mask_generator.")}

    def networks(self, channels: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        """The prepared pattern and mask generators (eval mode, frozen) on ``device`` in ``dtype``, rebuilt from the
        prepared weights once per preparation, device and dtype (without moving the global RNG). Raises a one-line
        ``ValueError`` before :meth:`prepare`, or for images of another channel count than the preparation's."""
        prepared_channels = int(self.prepared("channels"))
        if channels != prepared_channels:
            raise ValueError(f"input_aware was prepared for {prepared_channels}-channel images but got {channels}; "
                             f"prepare it on these images")
        key = (self._prepared_key, device, dtype)
        if key not in self._networks:
            with torch.random.fork_rng(devices=[]):
                pattern_net = EncoderDecoder(channels, channels, self.widths)
                mask_net = EncoderDecoder(channels, 1, self.widths)
            load_weights(pattern_net, self._prepared or {}, "generator.")
            load_weights(mask_net, self._prepared or {}, "mask_generator.")
            self._networks = {k: v for k, v in self._networks.items() if k[0] == self._prepared_key}
            self._networks[key] = (frozen(pattern_net).to(device=device, dtype=dtype),
                                   frozen(mask_net).to(device=device, dtype=dtype))
        return self._networks[key]

    def triggered_by(self, images: Tensor, sources: Tensor) -> Tensor:
        """``images`` ``(N, C, H, W)`` carrying the pattern and mask generated from ``sources`` (the same shape)."""
        pattern_net, mask_net = self.networks(images.shape[1], images.device, images.dtype)
        return paste(images, pattern_of(pattern_net, sources), mask_of(mask_net, sources))

    def apply(self, images: Tensor) -> Tensor:
        """Each of ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1] with its own trigger: ``x + m(x) (g(x)
        - x)``. Raises a one-line ``ValueError`` before :meth:`prepare`. The generators are frozen: no graph is built
        unless ``images`` require gradients."""
        batch = images if images.dim() == 4 else images[None]
        return self.triggered_by(batch, batch).reshape(images.shape)

    def apply_noise(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The paper's cross mode: each of ``images`` ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1] carries the
        pattern and mask generated from another image of the batch, a seeded random cycle through them drawn from
        ``generator`` (never its own); a lone image carries those of its mirror image (flipped left to right). The
        data module keeps these samples' labels. Raises a one-line ``ValueError`` before :meth:`prepare`."""
        batch = images if images.dim() == 4 else images[None]
        sources = batch[partners(len(batch), generator).to(batch.device)] if len(batch) > 1 else batch.flip(-1)
        return self.triggered_by(batch, sources).reshape(images.shape)
