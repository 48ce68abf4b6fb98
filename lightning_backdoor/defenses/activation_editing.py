"""Activation-guided model editing with a repair step (Hsieh et al. 2024; METHOD.md §3), trigger known."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.data.augment import random_crop, random_flip
from lightning_backdoor.defenses.activations import (LayerActivations, capture, editable_layers, get_layer,
                                                     layer_weight_matrix)
from lightning_backdoor.defenses.base import Defense, UnseenData
from lightning_backdoor.defenses.editing import closed_form_edit, rank_r_edit, second_moment
from lightning_backdoor.triggers import Trigger

REPAIR_WEIGHTS = (1.0, 4.0, 16.0, 64.0, 256.0)


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Logits (N, K) of ``model`` in eval mode on float images (N, C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(chunk).float() for chunk in images.split(batch_size)])
    finally:
        model.train(was_training)


def augmented_views(images: Tensor, labels: Tensor, views: int, seed: int) -> tuple[Tensor, Tensor]:
    """The images plus ``views - 1`` seeded random crop (and, for RGB, flip) variants: more keys from few images."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        padding = max(1, images.shape[-1] // 8)
        extra = [random_crop(images, padding) for _ in range(views - 1)]
        if images.shape[1] == 3:
            extra = [random_flip(view) for view in extra]
    finally:
        torch.random.set_rng_state(state)
    return torch.cat([images, *extra]), labels.repeat(views)


def add_delta(model: nn.Module, layer_name: str, delta: Tensor) -> None:
    """W ← W + ΔW in place, ΔW given as (c_out, d)."""
    layer = get_layer(model, layer_name)
    with torch.no_grad():
        layer.weight.add_(delta.reshape(layer.weight.shape).to(layer.weight.dtype))


@dataclass
class EditProblem:
    """The data of one layer's edit: triggered non-target keys (n, d) with their clean target values (n, c_out)
    and weights (n,), the clean keys' second moment C (d, d) and that of the clean target-class keys (d, d)."""

    weight: Tensor
    keys: Tensor
    targets: Tensor
    key_weights: Tensor
    preserve: Tensor
    target_moment: Tensor | None

    @classmethod
    def build(cls, layer: nn.Module, clean: LayerActivations, triggered: LayerActivations, labels: Tensor,
              target_class: int, grid_weights: Tensor | None) -> EditProblem:
        non_target = labels != target_class
        if not non_target.any():
            raise ValueError("the unseen split holds no non-target images to edit with")
        targets = clean.values[non_target]
        if clean.skip is not None:  # the block outputs layer(x) + skip: cancel the trigger on the skip path too
            targets = targets + clean.skip[non_target] - triggered.skip[non_target]
        keys = triggered.keys[non_target]
        weights = torch.ones(keys.shape[:2]) if grid_weights is None else grid_weights.expand(keys.shape[:2])
        members = labels == target_class
        target_moment = second_moment(clean.keys[members].flatten(0, 1)) if members.any() else None
        return cls(layer_weight_matrix(layer).float(), keys.flatten(0, 1), targets.flatten(0, 1),
                   weights.flatten(), second_moment(clean.keys.flatten(0, 1)), target_moment)

    def solve(self, method: str, strength: float, rank: int, repair_weight: float = 0.0, seed: int = 0) -> Tensor:
        """ΔW (c_out, d); ``repair_weight`` pins clean target-class keys to their original values."""
        preserve = self.preserve
        if repair_weight > 0 and self.target_moment is not None:
            preserve = preserve + repair_weight * self.target_moment
        if method == "closed_form":
            return closed_form_edit(self.weight, self.keys, self.targets, preserve, strength, self.key_weights)
        return rank_r_edit(self.weight, self.keys, self.targets, preserve, rank, self.key_weights, seed=seed)

    def diagnostics(self, delta: Tensor, clean_keys: Tensor) -> dict[str, float]:
        """Relative residual of triggered keys before/after the edit and the relative change of clean outputs."""
        norm = self.targets.norm().clamp(min=1e-12)
        return {"triggered_residual_before": ((self.keys @ self.weight.T - self.targets).norm() / norm).item(),
                "triggered_residual_after": ((self.keys @ (self.weight + delta).T - self.targets).norm() / norm).item(),
                "clean_output_change": ((clean_keys @ delta.T).norm()
                                        / (clean_keys @ self.weight.T).norm().clamp(min=1e-12)).item(),
                "num_keys": len(self.keys)}


class ActivationEditing(Defense):
    """Edit one late layer so triggered activations map to clean ones; then repair the target class if it dropped.

    Args:
        layer: the layer to edit (e.g. ``blocks.2.conv1``), or ``auto``: try the last ``candidates`` editable
            layers and keep the one with the lowest cross-validated loss on the unseen split.
        method: ``closed_form`` (multi-key least squares) or ``rank_r`` (constrained low-rank edit).
        strength: λ, the weight of keeping clean keys' values against mapping triggered keys to clean values.
        rank: r of the ``rank_r`` edit.
        views: augmented views per unseen image (1 = the images only).
        spatial_weight: ``uniform`` over the feature grid, or ``mask``: the trigger's mask pooled to the grid
            (local triggers only; global triggers fall back to uniform).
        repair: run the repair step when the target class's confidence on unseen target images dropped.
        repair_tolerance: the drop in mean target-class probability on U that triggers the repair.
        candidates: how many of the last editable layers ``auto`` tries.
        seed: fixes the augmented views.
    """

    name = "editing"

    def __init__(self, layer: str = "auto", method: Literal["closed_form", "rank_r"] = "closed_form",
                 strength: float = 0.1, rank: int = 16, views: int = 4,
                 spatial_weight: Literal["uniform", "mask"] = "uniform", repair: bool = True,
                 repair_tolerance: float = 0.02, candidates: int = 3, seed: int = 0) -> None:
        if strength <= 0:
            raise ValueError(f"strength={strength} must be positive")
        if views < 1:
            raise ValueError(f"views={views} must be at least 1")
        self.layer, self.method, self.strength, self.rank, self.views = layer, method, strength, rank, views
        self.spatial_weight, self.repair, self.repair_tolerance = spatial_weight, repair, repair_tolerance
        self.candidates, self.seed = candidates, seed

    def defend(self, model: nn.Module, unseen: UnseenData, trigger: Trigger | None,
               target_class: int | None) -> dict[str, Any]:
        if trigger is None or target_class is None:
            raise ValueError("activation editing needs the trigger and the target class")
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        layers = editable_layers(model)[-self.candidates:] if self.layer == "auto" else [self.layer]
        for name in layers:
            get_layer(model, name)  # a wrong name or type fails before any work
        if self.repair and not (unseen.labels == target_class).any():
            raise ValueError(f"repair needs unseen images of the target class {target_class}; the unseen split has "
                             f"none (add unseen images or set repair=false)")
        images, labels = augmented_views(unseen.images.float(), unseen.labels, self.views, self.seed)
        triggered = trigger(images)
        clean_acts, triggered_acts = capture(model, layers, images), capture(model, layers, triggered)
        mask = trigger.mask(tuple(images.shape[1:])) if self.spatial_weight == "mask" else None
        info: dict[str, Any] = {"method": f"editing/{self.method}", "num_unseen": len(unseen.labels),
                                "views": self.views, "strength": self.strength}
        layer = layers[0]
        if self.layer == "auto":
            scores = {name: self._cross_validate(model, name, clean_acts[name], triggered_acts[name], images,
                                                 triggered, labels, target_class, mask) for name in layers}
            layer = min(scores, key=scores.get)
            info["layer_selection"] = scores
        problem = self._problem(model, layer, clean_acts[layer], triggered_acts[layer], labels, target_class, mask)
        delta = problem.solve(self.method, self.strength, self.rank, seed=self.seed)
        info |= {"layer": layer, "diagnostics": problem.diagnostics(delta, clean_acts[layer].keys.flatten(0, 1))}
        target_images = images[labels == target_class]
        confidence = {"before": self._target_confidence(model, target_images, target_class)}
        add_delta(model, layer, delta)
        confidence["after_edit"] = self._target_confidence(model, target_images, target_class)
        info["edit_seconds"] = time.perf_counter() - start
        edited_state = {key: value.clone() for key, value in get_layer(model, layer).state_dict().items()}
        repaired = self.repair and confidence["before"] - confidence["after_edit"] > self.repair_tolerance
        if repaired:
            add_delta(model, layer, -delta)
            for repair_weight in REPAIR_WEIGHTS:
                delta = problem.solve(self.method, self.strength, self.rank, repair_weight, seed=self.seed)
                add_delta(model, layer, delta)
                confidence["after_repair"] = self._target_confidence(model, target_images, target_class)
                if confidence["before"] - confidence["after_repair"] <= self.repair_tolerance:
                    break
                add_delta(model, layer, -delta)
            else:
                add_delta(model, layer, delta)
            info["repair_weight"] = repair_weight
            info["diagnostics_after_repair"] = problem.diagnostics(delta, clean_acts[layer].keys.flatten(0, 1))
        info |= {"repaired": repaired, "unseen_target_confidence": confidence, "edited_layer_state": edited_state,
                 "seconds": time.perf_counter() - start}
        model.train(was_training)
        return info

    def _problem(self, model: nn.Module, layer: str, clean: LayerActivations, triggered: LayerActivations,
                 labels: Tensor, target_class: int, mask: Tensor | None) -> EditProblem:
        grid = None
        if mask is not None and clean.keys.shape[1] > 1:
            side = int(round(clean.keys.shape[1] ** 0.5))
            grid = F.adaptive_max_pool2d(mask[None].float(), (side, side)).flatten().clamp(min=0.05)
        return EditProblem.build(get_layer(model, layer), clean, triggered, labels, target_class, grid)

    @staticmethod
    def _target_confidence(model: nn.Module, target_images: Tensor, target_class: int) -> float:
        """Mean probability of the target class on unseen target-class images: TA's smooth proxy on U."""
        if len(target_images) == 0:
            return float("nan")
        return predict_logits(model, target_images).softmax(-1)[:, target_class].mean().item()

    def _cross_validate(self, model: nn.Module, layer: str, clean: LayerActivations, triggered: LayerActivations,
                        images: Tensor, triggered_images: Tensor, labels: Tensor, target_class: int,
                        mask: Tensor | None) -> float:
        """Two-fold loss on U of editing ``layer``: CE of held-out triggered images plus CE of held-out clean ones."""
        count = len(labels) // self.views
        per_class = count // max(1, len(labels.unique()))
        fold = (torch.arange(count) % 2).repeat(self.views) if per_class >= 2 else labels % 2
        total = 0.0
        for held_out in (0, 1):
            fit, check = fold != held_out, fold == held_out
            subset = lambda acts: LayerActivations(acts.keys[fit], acts.values[fit],  # noqa: E731
                                                   None if acts.skip is None else acts.skip[fit])
            problem = self._problem(model, layer, subset(clean), subset(triggered), labels[fit], target_class, mask)
            delta = problem.solve(self.method, self.strength, self.rank, seed=self.seed)
            add_delta(model, layer, delta)
            attacked = check & (labels != target_class)
            total += F.cross_entropy(predict_logits(model, triggered_images[attacked]), labels[attacked]).item()
            total += F.cross_entropy(predict_logits(model, images[check]), labels[check]).item()
            add_delta(model, layer, -delta)
        return total / 2
