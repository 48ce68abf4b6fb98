"""Seeded split and poison plans, and applying a trigger to uint8 images. Pure torch, no Lightning."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lightning_backdoor.metrics import IGNORE
from lightning_backdoor.triggers import Trigger


@dataclass(frozen=True)
class SplitPlan:
    """Indices into the training pool: the unseen (defense) split, clean validation, training, and within training
    the poisoned samples and the trigger's noise-mode samples. All int64, sorted; unseen is ordered per class."""

    unseen: Tensor
    val: Tensor
    train: Tensor
    poisoned: Tensor
    noise: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


def plan_splits(labels: Tensor, num_classes: int, target_class: int | None, poison_rate: float,
                unseen_per_class: int, val_fraction: float, clean_label: bool, cross_ratio: float, seed: int,
                all_to_all: bool = False) -> SplitPlan:
    """Draw the splits for one seed: unseen first (never trained on, never poisoned), then validation, then poison.

    ``poison_rate`` is the fraction of the training split that carries the trigger. All-to-one attacks draw the
    poisoned samples from the classes other than ``target_class``; all-to-all attacks (every class ``y`` goes to
    ``(y + 1) mod K``, ``target_class`` unused) from every class, so each class is poisoned in proportion to its
    share of the training split; clean-label attacks from the target class only. Raises ``ValueError`` when a class
    is too small, the rate is more than the candidates allow, or ``clean_label`` is combined with ``all_to_all``
    (a clean-label attack has one target class) or an all-to-one attack has no ``target_class``.
    """
    if all_to_all and clean_label:
        raise ValueError("clean_label=true poisons one target class and keeps its labels; all_to_all=true has no "
                         "single target: use one or the other")
    if not all_to_all and target_class is None:
        raise ValueError("an all-to-one attack needs a target_class (or set all_to_all=true)")
    generator = torch.Generator().manual_seed(seed)
    unseen_parts = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        if len(members) <= unseen_per_class:
            raise ValueError(f"class {label} has {len(members)} training images, too few for unseen_per_class="
                             f"{unseen_per_class}; use unseen_per_class <= {len(members) - 1}")
        unseen_parts.append(members[torch.randperm(len(members), generator=generator)[:unseen_per_class]])
    # interleave classes so the first k*num_classes unseen images hold k per class: budgets nest
    unseen = torch.stack(unseen_parts, dim=1).flatten() if unseen_per_class else torch.empty(0, dtype=torch.long)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[unseen] = False
    pool = torch.nonzero(rest).flatten()
    pool = pool[torch.randperm(len(pool), generator=generator)]
    num_val = round(val_fraction * len(pool))
    val, train = pool[:num_val].sort().values, pool[num_val:]
    if all_to_all:
        candidates = train
    elif clean_label:
        candidates = train[labels[train] == target_class]
    else:
        candidates = train[labels[train] != target_class]
    num_poison = round(poison_rate * len(train))
    if num_poison > len(candidates):
        kind = "target-class" if clean_label else "non-target"
        raise ValueError(f"poison_rate={poison_rate} needs {num_poison} {kind} training images but only "
                         f"{len(candidates)} exist; use poison_rate <= {len(candidates) / len(train):.3f}")
    poisoned = candidates[:num_poison]  # train is already shuffled
    clean = train[~torch.isin(train, poisoned)]
    num_noise = min(round(cross_ratio * num_poison), len(clean))
    noise = clean[torch.randperm(len(clean), generator=generator)[:num_noise]]
    return SplitPlan(unseen, val, train.sort().values, poisoned.sort().values, noise.sort().values)


def attack_labels(labels: Tensor, target_class: int | None, all_to_all: bool, num_classes: int) -> Tensor:
    """The label the attack wants for each sample (N,) -> (N,): ``(y + 1) mod num_classes`` for every sample under
    ``all_to_all`` (``target_class`` unused: every class counts), else ``target_class``, or ``-1`` where the true
    label already is the target. Raises ``ValueError`` for all-to-one without a ``target_class``."""
    if all_to_all:
        return (labels + 1) % num_classes
    if target_class is None:
        raise ValueError("an all-to-one attack needs a target_class (or set all_to_all=true)")
    return torch.where(labels == target_class, torch.full_like(labels, IGNORE), torch.full_like(labels, target_class))


def to_float(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255)


def to_uint8(images: Tensor) -> Tensor:
    """float in [0, 1] -> uint8, rounded (as an attacker saving poisoned images would)."""
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def apply_trigger(trigger: Trigger, images: Tensor, batch_size: int = 2048) -> Tensor:
    """Apply ``trigger`` to uint8 images (N, C, H, W) in chunks; returns uint8."""
    chunks = [to_uint8(trigger(to_float(chunk))) for chunk in images.split(batch_size)]
    return torch.cat(chunks) if chunks else images.clone()


def apply_training_trigger(trigger: Trigger, images: Tensor, seed: int, batch_size: int = 2048) -> Tensor:
    """Apply the trigger as the poisoned training samples carry it (:meth:`Trigger.apply_for_training`, which is
    :meth:`Trigger.apply` for every trigger but Adaptive-Blend) to uint8 images (N, C, H, W); returns uint8."""
    generator = torch.Generator().manual_seed(seed + 2)  # seed + 1 is the noise mode's
    chunks = [to_uint8(trigger.apply_for_training(to_float(chunk), generator)) for chunk in images.split(batch_size)]
    return torch.cat(chunks) if chunks else images.clone()


def apply_noise_mode(trigger: Trigger, images: Tensor, seed: int, batch_size: int = 2048) -> Tensor:
    """Apply the trigger's noise mode (random variants trained with true labels) to uint8 images."""
    generator = torch.Generator().manual_seed(seed + 1)
    chunks = [to_uint8(trigger.apply_noise(to_float(chunk), generator)) for chunk in images.split(batch_size)]
    return torch.cat(chunks) if chunks else images.clone()
