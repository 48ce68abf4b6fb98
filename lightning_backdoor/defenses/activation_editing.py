"""Activation-guided model editing with a repair step (Hsieh et al. 2024; METHOD.md §3), trigger known."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.data.augment import random_crop, random_flip
from lightning_backdoor.defenses.activations import capture, editable_layers, get_layer, layer_weight_matrix
from lightning_backdoor.defenses.base import Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.editing import closed_form_edit, rank_r_edit, second_moment
from lightning_backdoor.triggers import Trigger


@dataclass
class EditedLayer:
    """A fitted edit: the layer, its weight change (c_out, d) and diagnostics of the fit."""

    layer: str
    delta: Tensor
    diagnostics: dict[str, float]


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
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        padding = max(1, images.shape[-1] // 8)
        extra = [random_crop(images, padding) for _ in range(views - 1)]
        if images.shape[1] == 3:
            extra = [random_flip(view) for view in extra]
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat([images, *extra]), labels.repeat(views)


def add_delta(model: nn.Module, layer_name: str, delta: Tensor) -> None:
    """W ← W + ΔW in place, ΔW given as (c_out, d)."""
    layer = get_layer(model, layer_name)
    with torch.no_grad():
        layer.weight.add_(delta.reshape(layer.weight.shape).to(layer.weight.dtype))


class ActivationEditing(Defense):
    """Edit one late layer so triggered activations map to clean ones; then repair the target class if it dropped.

    Args:
        layer: the layer to edit (e.g. ``blocks.2.conv2``), or ``auto`` to try the last ``candidates`` editable
            layers and keep the best by two-fold cross-validation on the unseen split.
        method: ``closed_form`` (multi-key least squares) or ``rank_r`` (constrained low-rank edit).
        strength: λ, the weight of keeping clean keys' values against mapping triggered keys to clean values.
        rank: r of the ``rank_r`` edit.
        views: augmented views per unseen image (1 = the images only).
        spatial_weight: ``uniform`` over the feature grid, or ``mask``: the trigger's mask pooled to the grid
            (local triggers only; global triggers fall back to uniform).
        repair: run the repair step when the target class's confidence on unseen target images dropped.
        repair_tolerance: the drop in mean target-class probability that triggers the repair.
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
               target_class: int | None) -> DefenseResult:
        if trigger is None or target_class is None:
            raise ValueError("activation editing needs the trigger and the target class")
        start = time.perf_counter()
        model = copy.deepcopy(model).float().eval()
        if self.layer != "auto":
            get_layer(model, self.layer)  # a wrong name fails before any work
        images, labels = augmented_views(unseen.images.float(), unseen.labels, self.views, self.seed)
        triggered = trigger(images)
        mask = trigger.mask(tuple(images.shape[1:])) if self.spatial_weight == "mask" else None
        selection = None
        layer = self.layer
        if layer == "auto":
            layer, selection = self.select_layer(model, images, triggered, labels, target_class, mask)
        edit = self.fit_edit(model, layer, images, triggered, labels, target_class, mask)
        target_before = self.target_confidence(model, images, labels, target_class)
        add_delta(model, layer, edit.delta)
        target_after_edit = self.target_confidence(model, images, labels, target_class)
        info: dict[str, Any] = {"method": f"editing/{self.method}", "layer": layer,
                                "num_unseen": len(unseen.labels), "views": self.views,
                                "strength": self.strength, "diagnostics": edit.diagnostics,
                                "unseen_target_confidence": {"before": target_before, "after_edit": target_after_edit}}
        if selection is not None:
            info["layer_selection"] = selection
        info["edit_seconds"] = time.perf_counter() - start
        info["edited_model"] = copy.deepcopy(model) if self.repair else None
        repaired = False
        if self.repair and target_before - target_after_edit > self.repair_tolerance:
            repaired = self.repair_target(model, layer, edit, images, triggered, labels, target_class, mask)
            info["unseen_target_confidence"]["after_repair"] = self.target_confidence(model, images, labels,
                                                                                      target_class)
        info["repaired"] = repaired
        info["seconds"] = time.perf_counter() - start
        return DefenseResult(model, info)

    def fit_edit(self, model: nn.Module, layer_name: str, images: Tensor, triggered: Tensor, labels: Tensor,
                 target_class: int, mask: Tensor | None, preserve_extra: Tensor | None = None,
                 extra_weight: float = 0.0) -> EditedLayer:
        """Fit ΔW at ``layer_name``: triggered non-target keys -> clean values, clean keys kept."""
        layer = get_layer(model, layer_name)
        clean, trig = capture(model, layer_name, images), capture(model, layer_name, triggered)
        non_target = labels != target_class
        if not non_target.any():
            raise ValueError("the unseen split holds no non-target images to edit with")
        keys = trig.keys[non_target]
        targets = clean.values[non_target]
        if clean.skip is not None:  # the block output is layer(x) + skip: cancel the skip path's trigger too
            targets = targets + clean.skip[non_target] - trig.skip[non_target]
        weights = self._spatial_weights(mask, keys.shape[:2], clean, layer)
        preserve = second_moment(clean.keys.flatten(0, 1))
        if preserve_extra is not None and extra_weight > 0:
            preserve = preserve + extra_weight * preserve_extra
        weight = layer_weight_matrix(layer).float()
        flat_keys, flat_targets, flat_weights = keys.flatten(0, 1), targets.flatten(0, 1), weights.flatten()
        if self.method == "closed_form":
            delta = closed_form_edit(weight, flat_keys, flat_targets, preserve, self.strength, flat_weights)
        else:
            delta = rank_r_edit(weight, flat_keys, flat_targets, preserve, self.rank, flat_weights, seed=self.seed)
        clean_keys = clean.keys.flatten(0, 1)
        before = (flat_keys @ weight.T - flat_targets).norm() / flat_targets.norm().clamp(min=1e-12)
        after = (flat_keys @ (weight + delta).T - flat_targets).norm() / flat_targets.norm().clamp(min=1e-12)
        moved = (clean_keys @ delta.T).norm() / (clean_keys @ weight.T).norm().clamp(min=1e-12)
        diagnostics = {"triggered_residual_before": before.item(), "triggered_residual_after": after.item(),
                       "clean_output_change": moved.item(), "num_keys": len(flat_keys)}
        return EditedLayer(layer_name, delta, diagnostics)

    def _spatial_weights(self, mask: Tensor | None, shape: torch.Size, clean: Any, layer: nn.Module) -> Tensor:
        count, positions = shape
        if mask is None or positions == 1:
            return torch.ones(count, positions)
        side = int(round(positions ** 0.5))
        pooled = F.adaptive_max_pool2d(mask[None].float(), (side, side)).flatten()
        return pooled.clamp(min=0.05).expand(count, positions)

    @staticmethod
    def target_confidence(model: nn.Module, images: Tensor, labels: Tensor, target_class: int) -> float:
        """Mean probability of the target class on the unseen target-class images (TA's smooth proxy on U)."""
        members = labels == target_class
        if not members.any():
            return float("nan")
        return predict_logits(model, images[members]).softmax(-1)[:, target_class].mean().item()

    def repair_target(self, model: nn.Module, layer_name: str, edit: EditedLayer, images: Tensor,
                      triggered: Tensor, labels: Tensor, target_class: int, mask: Tensor | None) -> bool:
        """Refit the edit with clean target-class keys pinned to their original values, doubling their weight
        until the target confidence on U is back within tolerance (or the weight cap is reached)."""
        members = labels == target_class
        if not members.any():
            raise ValueError(f"repair needs unseen images of the target class {target_class}; the unseen split "
                             f"has none (use repair=false or more unseen images per class)")
        add_delta(model, layer_name, -edit.delta)
        original = self.target_confidence(model, images, labels, target_class)
        target_keys = capture(model, layer_name, images[members]).keys.flatten(0, 1)
        target_moment = second_moment(target_keys)
        best = edit.delta
        for extra_weight in (1.0, 4.0, 16.0, 64.0):
            repaired = self.fit_edit(model, layer_name, images, triggered, labels, target_class, mask,
                                     target_moment, extra_weight)
            best = repaired.delta
            add_delta(model, layer_name, best)
            confidence = self.target_confidence(model, images, labels, target_class)
            add_delta(model, layer_name, -best)
            if original - confidence <= self.repair_tolerance:
                break
        add_delta(model, layer_name, best)
        return True

    def select_layer(self, model: nn.Module, images: Tensor, triggered: Tensor, labels: Tensor, target_class: int,
                     mask: Tensor | None) -> tuple[str, dict[str, float]]:
        """Two-fold cross-validation on U over the last editable layers; score = triggered CE + clean CE."""
        candidates = editable_layers(model)[-self.candidates:]
        count = len(labels) // self.views
        fold = (torch.arange(count) % 2).repeat(self.views)
        if count < 2 * len(labels.unique()):  # one image per class: split by class instead
            fold = (labels % 2)
        scores: dict[str, float] = {}
        for name in candidates:
            total = 0.0
            for held_out in (0, 1):
                fit, check = fold != held_out, (fold == held_out) & (labels != target_class)
                edit = self.fit_edit(model, name, images[fit], triggered[fit], labels[fit], target_class, mask)
                add_delta(model, name, edit.delta)
                total += F.cross_entropy(predict_logits(model, triggered[check]), labels[check]).item()
                total += F.cross_entropy(predict_logits(model, images[fold == held_out]), labels[fold == held_out]).item()
                add_delta(model, name, -edit.delta)
            scores[name] = total / 2
        return min(scores, key=scores.get), scores
