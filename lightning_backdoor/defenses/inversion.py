"""Trigger inversion: for every class at once, the smallest trigger that sends unseen images to that class.

Five parametrisations share one batched optimisation loop: Neural Cleanse's mask and pattern (Wang et al. 2019;
size = L1 norm of the mask, in pixels) for patch triggers, the same with one opacity for the whole image (size = the
opacity times the pixels: the L1 norm of that uniform mask) for blended triggers, a universal additive perturbation
(size = its L2 norm) for global triggers, a smooth displacement field (size = the mean shift, in pixels) for warping
triggers, and a mask over channels plus a bounded pattern in the feature space at the input of a late convolution
(size = channels masked) for triggers that no small input change expresses.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lightning_backdoor.defenses.activations import channels_last, layer_input, rewriting_input
from lightning_backdoor.registry import Registry
from lightning_backdoor.triggers import Trigger
from lightning_backdoor.triggers.wanet import identity_grid, warp


class MaskPatternTrigger(Trigger):
    """``x' = (1 - m) * x + m * p`` with a mask ``m`` (1, H, W) and a pattern ``p`` (C, H, W), both in [0, 1]."""

    def __init__(self, mask: Tensor, pattern: Tensor) -> None:
        super().__init__(seed=0)
        self._mask, self._pattern = mask.detach().cpu().float(), pattern.detach().cpu().float()

    def apply(self, images: Tensor) -> Tensor:
        mask, pattern = self._mask.to(images), self._pattern.to(images)
        return (1 - mask) * images + mask * pattern

    def mask(self, image_shape: tuple[int, int, int]) -> Tensor | None:
        return self._mask.clone()

    def picture(self) -> Tensor:
        """What the trigger paints, (C, H, W) in [0, 1]: the pattern where the mask is on, black elsewhere."""
        return self._mask * self._pattern

    def strengthened(self, factor: float) -> MaskPatternTrigger:
        """The same pattern under a ``factor`` times more opaque mask (clipped to 1)."""
        return MaskPatternTrigger((factor * self._mask).clamp(max=1.0), self._pattern)

    def moved(self, rows: int, columns: int) -> MaskPatternTrigger:
        """The same trigger ``rows`` pixels down and ``columns`` right (wrapping around the image)."""
        return MaskPatternTrigger(*(part.roll((rows, columns), dims=(1, 2)) for part in (self._mask, self._pattern)))

    def __repr__(self) -> str:
        return f"MaskPatternTrigger(mask_l1={self._mask.sum().item():.1f})"


class PerturbationTrigger(Trigger):
    """``x' = clamp(x + delta)`` with a universal perturbation ``delta`` (C, H, W): a global trigger."""

    def __init__(self, delta: Tensor) -> None:
        super().__init__(seed=0)
        self._delta = delta.detach().cpu().float()

    def apply(self, images: Tensor) -> Tensor:
        return (images + self._delta.to(images)).clamp(0.0, 1.0)

    def picture(self) -> Tensor:
        """The perturbation shown around mid-grey, scaled so its largest entry reaches black or white."""
        return 0.5 + 0.5 * self._delta / self._delta.abs().max().clamp(min=1e-8)

    def strengthened(self, factor: float) -> PerturbationTrigger:
        """The perturbation ``factor`` times larger."""
        return PerturbationTrigger(factor * self._delta)

    def __repr__(self) -> str:
        return f"PerturbationTrigger(l2={self._delta.norm().item():.3f})"


class FeatureTrigger(Trigger):
    """A trigger in feature space: ``f' = (1 - m) * f + m * p`` on the input ``f`` (N, C, H, W) of layer ``layer``,
    with a channel mask ``m`` (C, 1, 1) and a pattern ``p`` (C, H, W). Images pass unchanged: it acts only inside
    :meth:`attached`, where a forward pre-hook rewrites the layer's input."""

    def __init__(self, layer: str, mask: Tensor, pattern: Tensor) -> None:
        super().__init__(seed=0)
        self.layer = layer
        self._mask, self._pattern = mask.detach().cpu().float(), pattern.detach().cpu().float()

    def apply(self, images: Tensor) -> Tensor:
        return images

    def attached(self, model: nn.Module) -> ContextManager[None]:
        def stamp(features: Tensor) -> Tensor:
            mask, pattern = self._mask.to(features.device), self._pattern.to(features.device)
            return (1 - mask) * features + mask * pattern
        return rewriting_input(model, self.layer, stamp)

    def strengthened(self, factor: float) -> FeatureTrigger:
        """The same pattern under a ``factor`` times larger channel mask (clipped to 1)."""
        return FeatureTrigger(self.layer, (factor * self._mask).clamp(max=1.0), self._pattern)

    def __repr__(self) -> str:
        return f"FeatureTrigger(layer={self.layer!r}, channels={self._mask.sum().item():.1f})"


def sampling_grid(fields: Tensor) -> Tensor:
    """The ``grid_sample`` grid (N, H, W, 2) that reads every pixel at its position plus ``fields`` (N, H, W, 2),
    shifts in pixels (x, y); positions past the border read the border."""
    height, width = fields.shape[1:3]
    half_side = fields.new_tensor([(width - 1) / 2, (height - 1) / 2])  # pixels per unit of grid_sample's [-1, 1]
    return (identity_grid(height, width).to(fields) + fields / half_side).clamp(-1, 1)


class WarpTrigger(Trigger):
    """``x'`` = ``x`` sampled at every pixel's position plus a displacement ``field`` (H, W, 2) in pixels (x, y): a
    smooth warp."""

    def __init__(self, field: Tensor) -> None:
        super().__init__(seed=0)
        self._field = field.detach().cpu().float()

    def apply(self, images: Tensor) -> Tensor:
        return warp(images, sampling_grid(self._field[None].to(images)))

    def picture(self) -> Tensor:
        """The displacement as colour around mid-grey: red the horizontal shift, green the vertical one, scaled so
        the largest reaches 0 or 1."""
        shift = 0.5 * self._field.permute(2, 0, 1) / self._field.abs().max().clamp(min=1e-8)
        return 0.5 + torch.cat((shift, torch.zeros_like(shift[:1])))

    def strengthened(self, factor: float) -> WarpTrigger:
        """The displacement ``factor`` times larger."""
        return WarpTrigger(factor * self._field)

    def __repr__(self) -> str:
        return f"WarpTrigger(mean_shift={self._field.abs().sum(-1).mean().item():.3f}px)"


#: What an inversion yields: a fixed trigger that can also be made stronger (:meth:`strengthened`).
EstimatedTrigger = MaskPatternTrigger | PerturbationTrigger | FeatureTrigger | WarpTrigger


class NotApplicable(ValueError):
    """An inversion that cannot act on the given model; the message says why in one line."""


#: Inversion classes by name (the names ``estimators=`` takes); one registers with ``@INVERSIONS.register("<name>")``.
INVERSIONS: Registry[type[Inversion]] = Registry("trigger estimator")


class Inversion(nn.Module, ABC):
    """One candidate trigger per class, optimised jointly; subclasses define the trigger and its size."""

    name: str = ""
    #: Its candidates are patches, which a convolutional network detects wherever they sit (the edit also maps them
    #: moved: :class:`~lightning_backdoor.defenses.estimation.BackdoorEstimate`).
    local: bool = False

    @classmethod
    def create(cls, model: nn.Module, images: Tensor, num_classes: int, generator: torch.Generator,
               layer: str) -> Inversion:
        """Candidates for ``model`` and unseen ``images``; ``layer`` is the edited layer (feature inversions).

        Raises:
            NotApplicable: (one line) the inversion cannot act on this model.
        """
        return cls(num_classes, tuple(images.shape[1:]), generator)

    def attached(self, model: nn.Module) -> ContextManager[None]:
        """Where the candidates act inside the model (feature space); image-space inversions need nothing."""
        return nullcontext()

    @abstractmethod
    def apply(self, images: Tensor) -> Tensor:
        """Every class's candidate on a batch (B, C, H, W) -> (K, B, C, H, W)."""

    @abstractmethod
    def sizes(self) -> Tensor:
        """The penalised size of each class's candidate, (K,)."""

    @abstractmethod
    def trigger(self, label: int) -> EstimatedTrigger:
        """Class ``label``'s candidate as a fixed trigger."""

    def select(self, rows: Tensor) -> Inversion:
        """A copy holding only the candidates at ``rows`` (R,) int64, in that order (candidate i of the copy is
        candidate ``rows[i]`` of this one): every parameter's first dimension is the candidate, buffers are not per
        candidate and are copied whole. A subclass with other per-candidate state overrides this."""
        chosen = copy.deepcopy(self)
        for name, parameter in self.named_parameters(recurse=False):
            setattr(chosen, name, nn.Parameter(parameter.detach()[rows].clone()))
        return chosen


@INVERSIONS.register("neural_cleanse")
class MaskPatternInversion(Inversion):
    """Neural Cleanse: mask = sigmoid(a) (K, 1, H, W), pattern = sigmoid(b) (K, C, H, W); size = L1 of the mask."""

    local = True
    #: One mask value for the whole image (K, 1, 1, 1), its L1 norm that value times the pixels.
    uniform: bool = False

    def __init__(self, num_classes: int, image_shape: tuple[int, int, int], generator: torch.Generator) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.pixels_per_entry = height * width if self.uniform else 1
        # start half-covered with a random pattern: easy success, then the L1 cost shrinks the mask
        mask_shape = (1, 1) if self.uniform else (height, width)
        self.mask_logit = nn.Parameter(torch.zeros(num_classes, 1, *mask_shape))
        self.pattern_logit = nn.Parameter(torch.randn(num_classes, channels, height, width, generator=generator))

    def apply(self, images: Tensor) -> Tensor:
        mask, pattern = self.mask_logit.sigmoid()[:, None], self.pattern_logit.sigmoid()[:, None]
        return (1 - mask) * images[None] + mask * pattern

    def sizes(self) -> Tensor:
        return self.mask_logit.sigmoid().flatten(1).sum(1) * self.pixels_per_entry

    def trigger(self, label: int) -> MaskPatternTrigger:
        pattern = self.pattern_logit[label].sigmoid()
        return MaskPatternTrigger(self.mask_logit[label].sigmoid().expand(1, *pattern.shape[1:]), pattern)


@INVERSIONS.register("blend")
class BlendInversion(MaskPatternInversion):
    """Neural Cleanse with a uniform mask: ``(1 - a) * x + a * p`` with one opacity a = sigmoid(α) per class and a
    pattern sigmoid(b) (K, C, H, W); size = a * H * W, the L1 norm of that mask (pixels, as Neural Cleanse's)."""

    local = False
    uniform = True


@INVERSIONS.register("perturbation")
class PerturbationInversion(Inversion):
    """Universal adversarial perturbation toward each class: delta (K, C, H, W); size = its L2 norm."""

    def __init__(self, num_classes: int, image_shape: tuple[int, int, int], generator: torch.Generator) -> None:
        super().__init__()
        self.delta = nn.Parameter(1e-3 * torch.randn(num_classes, *image_shape, generator=generator))

    def apply(self, images: Tensor) -> Tensor:
        return (images[None] + self.delta[:, None]).clamp(0.0, 1.0)

    def sizes(self) -> Tensor:
        return self.delta.flatten(1).norm(dim=1)

    def trigger(self, label: int) -> PerturbationTrigger:
        return PerturbationTrigger(self.delta[label])


@INVERSIONS.register("warp")
class WarpInversion(Inversion):
    """A smooth warp toward each class: displacements (K, 2, 8, 8) in pixels on a control grid, upsampled bicubically
    to the image (as WaNet builds its field); size = the mean displacement, in pixels (L1 over x and y)."""

    control_points = 8

    def __init__(self, num_classes: int, image_shape: tuple[int, int, int], generator: torch.Generator) -> None:
        super().__init__()
        _, height, width = image_shape
        self.image_size = (height, width)
        shape = (num_classes, 2, self.control_points, self.control_points)
        self.control = nn.Parameter(1e-2 * torch.randn(shape, generator=generator))

    def fields(self) -> Tensor:
        """Every class's displacement field, (K, H, W, 2) in pixels."""
        fields = F.interpolate(self.control, size=self.image_size, mode="bicubic", align_corners=True)
        return fields.permute(0, 2, 3, 1)

    def apply(self, images: Tensor) -> Tensor:
        num_classes, batch = len(self.control), len(images)
        grids = sampling_grid(self.fields()).repeat_interleave(batch, dim=0)  # every class's grid for each image
        return warp(images.repeat(num_classes, 1, 1, 1), grids).view(num_classes, *images.shape)

    def sizes(self) -> Tensor:
        return self.fields().abs().sum(-1).flatten(1).mean(1)

    def trigger(self, label: int) -> WarpTrigger:
        return WarpTrigger(self.fields()[label])


@INVERSIONS.register("feature")
class FeatureInversion(Inversion):
    """Neural Cleanse in the feature space at a layer's input (``estimation.feature_layer``: the convolution before
    the edited one): a mask over channels sigmoid(a) (K, C, 1, 1)
    (over units, (K, C), for a linear layer) and a pattern sigmoid(b) (K, C, ...) scaled by each channel's largest
    value on U (so it stays in the activations' range); size = channels masked (L1 of the mask). Each candidate acts
    on its own copy of the batch."""

    def __init__(self, layer: str, channel_max: Tensor, num_classes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("channel_max", channel_max, persistent=False)  # fixed: not a candidate's state
        mask_shape = (num_classes, channel_max.shape[0], *[1] * (channel_max.dim() - 1))
        self.mask_logit = nn.Parameter(torch.zeros(mask_shape))
        self.pattern_logit = nn.Parameter(torch.randn(num_classes, *channel_max.shape, generator=generator))

    @classmethod
    def create(cls, model: nn.Module, images: Tensor, num_classes: int, generator: torch.Generator,
               layer: str) -> FeatureInversion:
        features = layer_input(model, layer, images)  # (N, C, H, W) for a conv, (N, C) for a linear layer
        if features.shape == images.shape:
            raise NotApplicable(f"the feature estimator masks channels at the input of a convolution before the "
                                f"edited layer, but this model's ({layer!r}) reads the image itself: no feature space "
                                f"(e.g. a ViT, whose only convolution is its patch embedding)")
        other_dims = [0, *range(2, features.dim())]
        channel_max = features.amax(dim=other_dims).clamp(min=1e-6).view(-1, *[1] * (features.dim() - 2))
        return cls(layer, channel_max.expand(features.shape[1:]).clone(), num_classes, generator)

    def pattern(self) -> Tensor:
        return self.pattern_logit.sigmoid() * self.channel_max

    def apply(self, images: Tensor) -> Tensor:
        return images[None].expand(len(self.mask_logit), *images.shape)

    def attached(self, model: nn.Module) -> ContextManager[None]:
        def stamp(features: Tensor) -> Tensor:
            features = features.unflatten(0, (len(self.mask_logit), -1))  # (K, B, C, H, W)
            mask, pattern = self.mask_logit.sigmoid()[:, None], self.pattern()[:, None]
            return ((1 - mask) * features + mask * pattern).flatten(0, 1)
        return rewriting_input(model, self.layer, stamp)

    def sizes(self) -> Tensor:
        return self.mask_logit.sigmoid().flatten(1).sum(1)

    def trigger(self, label: int) -> FeatureTrigger:
        return FeatureTrigger(self.layer, self.mask_logit[label].sigmoid(), self.pattern()[label])


@dataclass
class InversionResult:
    """Per class (K,): the smallest size that reached the success rate (the last candidate's size for a class that
    never did), the success rate of that candidate on all unseen images of other classes (NaN for a class whose
    optimisation was cut short by a pre-screen: not measured), whether it ever succeeded, and the steps it was
    optimised; plus the steps of the run (its longest class) and the candidates (each class's best, or its last
    where it never succeeded)."""

    sizes: Tensor
    success: Tensor
    converged: Tensor
    steps: int
    inversion: Inversion
    class_steps: Tensor | None = None


#: When an inversion stops early: ``class``: each class on its own, once its best size has not improved by 1 % for
#: ``patience`` steps (after it first succeeded); ``all``: the whole run, once no class's has (the original rule).
EarlyStop = Literal["class", "all"]


class InversionRun:
    """A batched inversion that runs in stages and can be narrowed to some classes between them: the pre-screen
    optimises every class a few steps, the full inversion continues only the suspicious ones from where they were
    (same parameters, Adam moments and adaptive costs), and with ``early_stop="class"`` each class leaves the batch
    once it has converged, so a step costs forward passes of the live classes only.

    The objective per class is Neural Cleanse's (Wang et al., IEEE S&P 2019): CE toward the class on unseen images
    of other classes plus an adaptive cost times the candidate's size. The cost starts at 0 and is set to
    ``init_cost`` once the class first reaches ``success_rate`` on its batch; it then grows x1.2 per step while the
    class succeeds and shrinks /1.2^1.5 while it fails. A class's best candidate is the smallest that succeeded.

    Args:
        inversion: every class's candidate (K rows); after the run it holds each class's best candidate (the last
            one where the class never succeeded).
        lr: Adam's step size.
        init_cost: the cost of size once a class first succeeds.
        success_rate: share of a batch's other-class images that must reach the class.
        patience: steps without a 1 % improvement of a class's best size after which it (``early_stop="class"``) or
            the run (``"all"``, when that holds for every class and every class has succeeded) stops.
        early_stop: ``class`` or ``all`` (:data:`EarlyStop`).
    """

    def __init__(self, inversion: Inversion, *, lr: float = 0.1, init_cost: float = 1e-3, success_rate: float = 0.95,
                 patience: int = 25, early_stop: EarlyStop = "class") -> None:
        if early_stop not in ("class", "all"):
            raise ValueError(f"early_stop={early_stop!r} must be 'class' or 'all'")
        self.inversion, self.lr, self.init_cost, self.success_rate = inversion, lr, init_cost, success_rate
        self.patience, self.early_stop = patience, early_stop
        num_classes = len(inversion.sizes())
        device = next(inversion.parameters()).device
        self.cost = torch.zeros(num_classes, device=device)
        self.best = torch.full((num_classes,), float("inf"), device=device)
        self.last_improved = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.class_steps = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.step = 0
        self.live_classes = torch.arange(num_classes, device=device)
        self.live = inversion.select(self.live_classes)
        self.optimizer = torch.optim.Adam(self.live.parameters(), lr=lr, betas=(0.5, 0.9))

    @property
    def done(self) -> bool:
        """Every class has stopped."""
        return len(self.live_classes) == 0

    def sizes(self) -> Tensor:
        """Each class's best size so far, or its current one where it has not yet succeeded, (K,)."""
        with torch.no_grad():
            current = self.inversion.sizes().detach().clone()
            if len(self.live_classes):
                current[self.live_classes] = self.live.sizes().detach()
        return torch.where(torch.isfinite(self.best), self.best, current)

    def keep(self, classes: Tensor) -> None:
        """Stop every live class not in ``classes`` (K',) int64: it keeps its best (or last) candidate."""
        wanted = torch.isin(self.live_classes, classes.to(self.live_classes.device))
        self._narrow(wanted)

    def run(self, model: nn.Module, images: Tensor, labels: Tensor, steps: int, *, batch_size: int = 8,
            bf16: bool = True, generator: torch.Generator | None = None, progress: bool = True,
            description: str = "trigger estimation") -> None:
        """Up to ``steps`` more steps of every live class on ``batch_size`` unseen images drawn by ``generator``;
        ``images`` float (N, C, H, W) in [0, 1], ``labels`` (N,); the model is frozen (no weight gradients);
        ``bf16`` runs the forward pass under bfloat16 autocast (about 2x faster on a CPU with native bfloat16,
        slower where it is emulated)."""
        requires_grad = [parameter.requires_grad for parameter in model.parameters()]
        model.requires_grad_(False)
        bar = tqdm(total=steps, desc=description, disable=None if progress else True, leave=False)  # None: off when
        # the output is no terminal (a log file would collect every redraw)
        try:
            for _ in range(steps):
                if self.done:
                    break
                self._step(model, images, labels, batch_size, bf16, generator)
                bar.update()
                bar.set_postfix(live=len(self.live_classes), median_size=f"{self.best.median().item():.3g}")
        finally:
            bar.close()
            for parameter, flag in zip(model.parameters(), requires_grad):
                parameter.requires_grad_(flag)

    def _step(self, model: nn.Module, images: Tensor, labels: Tensor, batch_size: int, bf16: bool,
              generator: torch.Generator | None) -> None:
        live, classes = self.live, self.live_classes
        batch = torch.randint(len(images), (batch_size,), generator=generator).to(images.device)
        with live.attached(model):  # feature-space candidates act through a hook on the layer
            candidates = live.apply(images[batch])  # (A, B, C, H, W)
            logits = forward(model, candidates.flatten(0, 1), bf16).view(len(classes), batch_size, -1)
        wanted = classes[:, None].expand(-1, batch_size)
        other = (labels[batch][None] != classes[:, None]).float()  # images already of the class teach nothing
        ce = F.cross_entropy(logits.flatten(0, 1), wanted.flatten(), reduction="none").view_as(other)
        ce = (ce * other).sum(1) / other.sum(1).clamp(min=1)
        sizes = live.sizes()
        cost = self.cost[classes]
        self.optimizer.zero_grad(set_to_none=True)
        (ce + cost * sizes).sum().backward()
        with torch.no_grad():
            hits = ((logits.argmax(-1) == wanted).float() * other).sum(1) / other.sum(1).clamp(min=1)
            succeeded = hits >= self.success_rate
            cost = torch.where(succeeded & (cost == 0), torch.full_like(cost, self.init_cost), cost)
            self.cost[classes] = torch.where(succeeded, cost * 1.2, cost / 1.2 ** 1.5)
            improved = succeeded & (sizes < 0.99 * self.best[classes])
            if improved.any():
                self.best[classes[improved]] = sizes.detach()[improved]
                self.last_improved[classes[improved]] = self.step
                self._record(improved)  # the candidate that reached this size, before the step moves it
        self.optimizer.step()
        self.class_steps[classes] += 1
        self.step += 1
        stalled = (self.step - 1 - self.last_improved[classes] >= self.patience) & torch.isfinite(self.best[classes])
        if self.early_stop == "class" and stalled.any():
            self._narrow(~stalled)
        elif self.early_stop == "all" and stalled.all():
            self._narrow(torch.zeros_like(stalled))

    def _record(self, rows: Tensor) -> None:
        """Copy the live candidates at ``rows`` (A,) bool into their classes' rows of ``inversion``."""
        with torch.no_grad():
            targets = self.live_classes[rows]
            for name, parameter in self.live.named_parameters(recurse=False):
                getattr(self.inversion, name)[targets] = parameter.detach()[rows]

    def _narrow(self, keep: Tensor) -> None:
        """Keep the live classes at ``keep`` (A,) bool; a leaving class that never succeeded records its last
        candidate. Adam's moments of the kept rows carry over."""
        never = ~keep & ~torch.isfinite(self.best[self.live_classes])
        if never.any():
            self._record(never)
        rows = keep.nonzero().flatten()
        narrowed = self.live.select(rows)
        optimizer = torch.optim.Adam(narrowed.parameters(), lr=self.lr, betas=(0.5, 0.9))
        for old, new in zip(self.live.parameters(), narrowed.parameters()):
            state = self.optimizer.state.get(old)
            if state:
                optimizer.state[new] = {key: value[rows].clone() if value.dim() and len(value) == len(keep)
                                        else value.clone() for key, value in state.items()}
        self.live, self.live_classes, self.optimizer = narrowed, self.live_classes[rows], optimizer

    def finish(self, model: nn.Module, images: Tensor, labels: Tensor, bf16: bool = True,
               measured: Tensor | None = None) -> InversionResult:
        """Stop every class and measure the success rate of the candidates of ``measured`` (K,) bool (default:
        every class; NaN elsewhere)."""
        if not self.done:
            self._narrow(torch.zeros_like(self.live_classes, dtype=torch.bool))
        num_classes = len(self.best)
        converged = torch.isfinite(self.best)
        with torch.no_grad():
            sizes = torch.where(converged, self.best, self.inversion.sizes().detach())
            success = torch.full((num_classes,), float("nan"), device=sizes.device)
            rows = (measured if measured is not None else torch.ones_like(converged)).nonzero().flatten()
            if len(rows):
                chosen = self.inversion.select(rows)
                with chosen.attached(model):
                    success[rows] = candidate_success(model, images, labels, chosen, bf16, classes=rows)
        return InversionResult(sizes.cpu(), success.cpu(), converged.cpu(), self.step, self.inversion,
                               self.class_steps.cpu())


def invert(model: nn.Module, images: Tensor, labels: Tensor, inversion: Inversion, *, max_steps: int = 100,
           batch_size: int = 8, lr: float = 0.1, init_cost: float = 1e-3, success_rate: float = 0.95,
           patience: int = 25, bf16: bool = True, generator: torch.Generator | None = None,
           progress: bool = True, early_stop: EarlyStop = "all") -> InversionResult:
    """Optimise every class's candidate at once for up to ``max_steps`` steps (:class:`InversionRun`, one stage,
    every class) and measure each best candidate's success rate.

    ``images`` float (N, C, H, W) in [0, 1], ``labels`` (N,); the model is frozen (no weight gradients).
    ``bf16`` runs the forward pass under bfloat16 autocast (about 2x faster on a CPU with native bfloat16, slower
    where it is emulated).
    """
    run = InversionRun(inversion, lr=lr, init_cost=init_cost, success_rate=success_rate, patience=patience,
                       early_stop=early_stop)
    run.run(model, images, labels, max_steps, batch_size=batch_size, bf16=bf16, generator=generator,
            progress=progress, description=f"trigger estimation ({inversion.name})")
    return run.finish(model, images, labels, bf16)


def forward(model: nn.Module, images: Tensor, bf16: bool) -> Tensor:
    """float32 logits (N, K) of ``images`` (N, C, H, W), channels-last (faster convolutions), optionally in bf16."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
        return model(channels_last(images)).float()


@torch.no_grad()
def candidate_success(model: nn.Module, images: Tensor, labels: Tensor, inversion: Inversion, bf16: bool = False,
                      batch_size: int = 100, classes: Tensor | None = None) -> Tensor:
    """Per candidate: the fraction of unseen images of other classes that it sends to its class, (R,); candidate i
    aims at class ``classes[i]`` (default: i). A feature-space inversion must be attached to ``model``."""
    count = len(inversion.sizes())
    classes = (torch.arange(count) if classes is None else classes).to(images.device)[:, None]
    hits = torch.zeros(count, device=images.device)
    for chunk, chunk_labels in zip(images.split(batch_size), labels.split(batch_size)):
        predicted = forward(model, inversion.apply(chunk).flatten(0, 1), bf16).argmax(-1).view(count, -1)
        hits += ((predicted == classes) & (chunk_labels[None] != classes)).sum(1)
    others = (labels[None] != classes).sum(1).clamp(min=1)
    return hits / others
