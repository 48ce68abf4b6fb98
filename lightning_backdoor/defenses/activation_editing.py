"""Activation-guided model editing with a repair step (Hsieh et al. 2024; METHOD.md §3), trigger known."""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.data.augment import random_crop, random_flip
from lightning_backdoor.defenses.adapt import logits_of
from lightning_backdoor.defenses.activations import (LayerActivations, auto_candidates, capture, capture_with_logits,
                                                     check_residual_sums, editable_layers, get_layer, key_positions,
                                                     layer_weight_matrix, run_with_hooks)
from lightning_backdoor.defenses.base import (DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData,
                                             check_seed)
from lightning_backdoor.defenses.editing import (KeyRows, closed_form_edit, key_space_edit, key_subspace, ledoit_wolf,
                                                moment, protected_edit, rank_r_edit, shrinkage)
from lightning_backdoor.defenses.inversion import FeatureTrigger
from lightning_backdoor.defenses.prior import batchnorm_key_prior, feeding_batchnorm
from lightning_backdoor.defenses.residual import residual_branch_of
from lightning_backdoor.defenses.suffix import MEMORY_FRACTION as SUFFIX_MEMORY_FRACTION
from lightning_backdoor.defenses.suffix import SuffixPasses
from lightning_backdoor.triggers import Trigger, acts_on_pixels, crop_distance, distinct_mirror, distinct_shifts

REPAIR_WEIGHTS = (1.0, 4.0, 16.0, 64.0, 256.0)
#: the default tolerance τ of the repair's signal and guard (the guard's, too, when a negative one forces the repair)
REPAIR_TOLERANCE = 0.02
REPAIR_ENERGIES = (0.5, 0.9, 0.99)
STRENGTHS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
PRIOR_WEIGHTS = (0.0, 0.25, 0.5)
#: the edit is solved in the span of its keys (:class:`~lightning_backdoor.defenses.editing.KeyRows`) when U's keys
#: are at most this fraction of the key width (measured: docs/results/edit-cost.md, "Wide layers and few keys")
KEY_SPACE_RATIO = 1.0
#: d x d float32 matrices the moments form holds at once for a candidate layer (A, C and T of each fold piece, their
#: sums and the solve's own, with room to spare): a layer whose moments would not fit in the memory available is
#: skipped by ``layer: auto`` and refused by name
MOMENT_COPIES = 12
#: ``mirror: null`` adds a trigger's mirror image to the edit when it sends at least this fraction of U's non-target
#: images to the target class before the edit (a model trained with random flips: 95 % on CIFAR-10 BadNets; one
#: trained without: 2 %); ``shift`` adds a moved trigger by the same rule
MIRROR_SUCCESS = 0.5
#: the success checks of the mirror image and the moves run on at most this many of U's non-target images (a seeded
#: random subset; all of them when there are fewer): a fraction near :data:`MIRROR_SUCCESS` is then known to about
#: ±3 pt (one standard error), and each check costs a forward pass of 256 images, not of all of U (at 2,500 unseen
#: images the 7 checks of the CIFAR-10 BadNets edit took 2.6 s: docs/results/edit-cost.md)
SUCCESS_IMAGES = 256
#: the triggers the edit adds itself (the mirror images and the moves) bring their triggered keys from at most this
#: many of the edit's non-target images (a seeded random subset, its sums scaled up to all of them; all of them when
#: there are fewer): each added trigger then costs a forward pass of 256 images, not of all of U (at 2,500 unseen
#: images the CIFAR-10 BadNets edit's 7 added triggers had made 7 of its 9 passes: docs/results/edit-cost.md)
ADDED_TRIGGER_IMAGES = 256
TRIGGERED_SUMS = ("triggered_moment", "residual_moment", "residual_energy", "target_energy", "triggered_count")


def _positive(value: object) -> bool:
    """Whether ``value`` is a finite number > 0 (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the memory cgroup mounted at ``root`` allows beyond what it uses now: cgroup v2's ``memory.max`` −
    ``memory.current``, else cgroup v1's ``memory/memory.limit_in_bytes`` − ``memory/memory.usage_in_bytes`` (v1
    writes no limit as a huge number); the usage less the inactive page cache (``memory.stat``'s ``inactive_file``,
    v1 ``total_inactive_file``), which the kernel reclaims before it refuses memory (as ``docker stats`` counts it).
    ``None`` where neither is readable or v2 says ``max`` (no limit)."""
    for limit, usage, stat, cache in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                      ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                       "memory/memory.stat", "total_inactive_file")):
        try:
            ceiling = (root / limit).read_text(encoding="ascii").strip()
            if ceiling == "max":
                return None
            used = int((root / usage).read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue
        try:
            counts = dict(line.split() for line in (root / stat).read_text(encoding="ascii").splitlines())
            used -= min(used, int(counts.get(cache, 0)))
        except (OSError, ValueError):
            pass
        return max(0, int(ceiling) - used)
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping, on Linux: the least of the machine's ``MemAvailable``
    (``/proc/meminfo``), what its cgroup allows beyond what the cgroup uses (:func:`cgroup_headroom`: a container's
    limit) and what the address-space limit (``ulimit -v``) leaves beyond this process's size.
    ``None`` where none of them is known (e.g. macOS): no check is made then."""
    limits = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines())
        limits.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    headroom = cgroup_headroom()
    if headroom is not None:
        limits.append(headroom)
    try:
        import resource

        ceiling = resource.getrlimit(resource.RLIMIT_AS)[0]
        if ceiling != resource.RLIM_INFINITY:
            status = Path("/proc/self/status").read_text(encoding="ascii")
            size = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:"))
            limits.append(max(0, ceiling - size))
    except (ImportError, OSError, ValueError, StopIteration):
        pass
    return min(limits) if limits else None


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 500, bf16: bool = False) -> Tensor:
    """Logits (N, K), float32, of ``model`` in eval mode on float images (N, C, H, W); under bfloat16 autocast
    with ``bf16``."""
    return run_with_hooks(model, images, [], batch_size, bf16)


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


def _float32(activations: LayerActivations) -> LayerActivations:
    """``activations`` with float32 keys (their moments then multiplied in float32)."""
    return replace(activations, keys=activations.keys.float())


def add_delta(model: nn.Module, layer_name: str, delta: Tensor) -> None:
    """W ← W + ΔW in place, ΔW given as (c_out, d)."""
    layer = get_layer(model, layer_name)
    with torch.no_grad():
        layer.weight.add_(delta.reshape(layer.weight.shape).to(layer.weight.dtype))


@contextmanager
def trial_edit(model: nn.Module, layer_name: str, delta: Tensor) -> Iterator[None]:
    """Apply ΔW for the duration of a block, then restore the exact original weights (W + Δ − Δ is not W)."""
    weight = get_layer(model, layer_name).weight
    original = weight.detach().clone()
    add_delta(model, layer_name, delta)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(original)


@contextmanager
def recording(passes: SuffixPasses | None, name: str | None) -> Iterator[None]:
    """``passes.recording(name)``; nothing without ``passes`` or ``name``."""
    if passes is None or name is None:
        yield
        return
    with passes.recording(name):
        yield


def one_standard_error_choice(scores: dict[tuple[str, float, float], tuple[float, float]], layers: list[str]
                              ) -> tuple[tuple[str, float, float], list[str]]:
    """The option ``(layer, prior weight, λ)`` chosen from its cross-validated ``(loss, standard error)`` on U: of
    the layers whose best loss is within one standard error of the lowest, the last in ``layers`` (definition order,
    the deepest), at its own lowest loss; and those layers, in order. Of one layer, simply the lowest loss.

    The one-standard-error rule of cross-validation (Hastie, Tibshirani & Friedman, *The Elements of Statistical
    Learning*, §7.10): losses that close cannot be told apart on U, and the deeper layer's edit carries over to
    triggers it was not fitted on where an earlier layer's need not. With the trigger unknown, on the CIFAR-10
    BadNets model, the lowest loss chose ``blocks.2.conv1`` over ``blocks.2.conv2`` by 0.023 nats, well within its
    standard error, and its edit removed the estimated triggers but left the true one at 6.7 % ASR (floor 1.9 %),
    where ``blocks.2.conv2`` took it to 2.1 % (docs/results/cifar10.md)."""
    lowest = min(scores, key=lambda option: scores[option][0])
    bound = sum(scores[lowest])
    best_of = {name: min((option for option in scores if option[0] == name), key=lambda option: scores[option][0])
               for name in dict.fromkeys(option[0] for option in scores)}
    within = [name for name in layers if name in best_of and scores[best_of[name]][0] <= bound]
    return best_of[within[-1]], within


def attack_log_loss(logits: Tensor, target_class: int) -> Tensor:
    """−log(1 − p(target)) per row of ``logits`` (N, K), in nats: the log-loss of the attack failing, whatever
    other class the image goes to (0 when the target gets no probability). Computed as logsumexp over all classes
    minus logsumexp over the others, exact where p(target) is near 1."""
    logits = logits.float()
    others = logits.clone()
    others[:, target_class] = float("-inf")
    return torch.logsumexp(logits, -1) - torch.logsumexp(others, -1)


class Triggered(NamedTuple):
    """A trigger the edit maps, with its triggered images: of all the edit's images (``rows`` None) or of those
    ``rows`` (sorted indices into them) selects."""

    trigger: Trigger
    images: Tensor
    rows: Tensor | None = None

    def of(self, selected: Tensor) -> Tensor:
        """``selected`` (a boolean mask over all the edit's images), restricted to and indexed like this trigger's
        images."""
        return selected if self.rows is None else selected[self.rows]


def _image_space(trigger: Trigger, index: int) -> str | None:
    """The held-out passes' name for the images of the ``index``-th trigger, or None for a feature-space trigger
    (it acts through a hook inside the model, which the shortcut's records would bypass: its passes stay whole)."""
    return f"trigger {index}" if acts_on_pixels(trigger) else None


@dataclass
class EditProblem:
    """Sufficient statistics of one layer's edit, additive over images (so folds combine by ``+``).

    Sums over triggered non-target keys k* (weighted by w): A = Σ w k* k*ᵀ, R = Σ w (v* − W0 k*) k*ᵀ, and
    Σ w ‖v* − W0 k*‖²; over clean keys: C = Σ k kᵀ and Σ ‖k‖⁴ (for shrinkage); over clean target-class keys:
    T = Σ k kᵀ; with their counts. Not additive: ``prior``, a prior key moment (d, d) mixed into the preserved
    moment with ``prior_weight`` in place of the Ledoit–Wolf shrinkage (:mod:`~lightning_backdoor.defenses.prior`).

    The moments A, R, C and T are (d, d) and (c_out, d) tensors, or, for a problem built ``factored``, the keys
    themselves (:class:`~lightning_backdoor.defenses.editing.KeyRows`: A's rows √w k*, R's rows √w (v* − W0 k*) in
    the same order, C's and T's rows k): the same sums, solved in the span of the keys (closed form only, no
    prior, pin repair only).
    """

    weight: Tensor
    triggered_moment: Tensor | KeyRows
    residual_moment: Tensor | KeyRows
    residual_energy: Tensor
    target_energy: Tensor
    triggered_count: Tensor
    clean_moment: Tensor | KeyRows
    clean_fourth: Tensor
    clean_count: Tensor
    target_moment: Tensor | KeyRows
    target_count: Tensor
    prior: Tensor | None = None
    prior_weight: float = 0.0

    @classmethod
    def build(cls, layer: nn.Module, clean: LayerActivations, triggered: LayerActivations, labels: Tensor,
              target_class: int, grid_weights: Tensor | None, subset: Tensor | None = None, factored: bool = False
              ) -> EditProblem:
        """The sums over the images of ``clean`` and ``triggered`` (activations of the same images, in order, with
        their ``labels``) that ``subset`` selects (a boolean mask; default: all); ``grid_weights`` (L,) weigh the
        positions of the triggered keys (default: all 1). Keys may be bfloat16 (a bf16 capture): their moments are
        then multiplied in bfloat16. Each key set is indexed once (no copy of a copy). ``factored``: keep the keys
        (float32) instead of their moments."""
        chosen = torch.ones_like(labels, dtype=torch.bool) if subset is None else subset
        non_target, target = chosen & (labels != target_class), chosen & (labels == target_class)
        clean_keys = clean.keys[non_target].flatten(0, 1)
        target_keys = clean.keys[target].flatten(0, 1)
        fourth = sum(torch.linalg.vector_norm(part, dim=1, dtype=torch.float32).pow(4).sum()
                     for part in (clean_keys, target_keys))
        device = clean_keys.device
        count = torch.tensor(float(len(clean_keys) + len(target_keys)), device=device)
        sums = cls.triggered_sums(clean, triggered, labels, target_class, grid_weights, subset, factored)
        if factored:
            return cls(layer_weight_matrix(layer).float(), **sums,
                       clean_moment=KeyRows(torch.cat([clean_keys, target_keys]).float()), clean_fourth=fourth,
                       clean_count=count, target_moment=KeyRows(target_keys.float()),
                       target_count=torch.tensor(float(len(target_keys)), device=device))
        target_moment = moment(target_keys, target_keys)
        return cls(layer_weight_matrix(layer).float(), **sums,
                   clean_moment=moment(clean_keys, clean_keys) + target_moment, clean_fourth=fourth,
                   clean_count=count, target_moment=target_moment,
                   target_count=torch.tensor(float(len(target_keys)), device=device))

    @staticmethod
    def triggered_sums(clean: LayerActivations, triggered: LayerActivations, labels: Tensor, target_class: int,
                       grid_weights: Tensor | None, subset: Tensor | None = None, factored: bool = False
                       ) -> dict[str, Tensor | KeyRows]:
        """:meth:`build`'s sums over the triggered keys alone (the fields :data:`TRIGGERED_SUMS` names), for
        :meth:`add_trigger`: a second trigger on the same images brings these, its clean sums being the first's."""
        chosen = torch.ones_like(labels, dtype=torch.bool) if subset is None else subset
        non_target = chosen & (labels != target_class)
        targets = clean.values[non_target]
        if clean.skip is not None:  # the block outputs layer(x) + skip: cancel the trigger on the skip path too
            targets = targets + clean.skip[non_target] - triggered.skip[non_target]
        keys = triggered.keys[non_target].flatten(0, 1)
        residual = (targets - triggered.values[non_target]).flatten(0, 1)  # v* = W0 k*, captured: no recomputation
        weights = (torch.ones(len(keys), device=keys.device) if grid_weights is None
                   else grid_weights.expand(targets.shape[:2]).flatten())
        energy = lambda vectors: (vectors.square().sum(1) * weights).sum()  # noqa: E731
        sums = {"residual_energy": energy(residual), "target_energy": energy(targets.flatten(0, 1)),
                "triggered_count": weights.sum()}
        if factored:
            root = weights.sqrt()[:, None]
            return sums | {"triggered_moment": KeyRows(keys.float() * root),
                           "residual_moment": KeyRows(residual.float() * root)}
        weighted = keys if grid_weights is None else keys * weights[:, None].to(keys.dtype)
        return sums | {"triggered_moment": moment(weighted, keys),
                       "residual_moment": moment(residual.to(keys.dtype), weighted)}

    def __add__(self, other: EditProblem) -> EditProblem:
        total = replace(self, **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                                 if f.name not in ("weight", "prior", "prior_weight")})
        if "_key_space" in vars(self) and "_key_space" in vars(other):  # both Gram matrices known (the two
            # cross-validation folds, then the final edit on both): only the products across them are new
            vars(total)["_key_space"] = self._joined_key_space(other)
        return total

    def _joined_key_space(self, other: EditProblem) -> tuple[Tensor, Tensor]:
        """The stacked keys and Gram matrix of ``self + other`` from those of each: their blocks and the products
        across them, reordered as the sum stacks its rows (A's of both, then C's, then T's)."""
        (keys, gram), (other_keys, other_gram) = self._key_space, other._key_space
        size, other_size = len(keys), len(other_keys)
        block = torch.empty(size + other_size, size + other_size, dtype=torch.float64, device=gram.device)
        block[:size, :size], block[size:, size:] = gram, other_gram
        block[:size, size:] = keys.double() @ other_keys.double().T
        block[size:, :size] = block[:size, size:].T
        order, start, other_start = [], 0, size
        for mine, theirs in ((self.triggered_moment, other.triggered_moment), (self.clean_moment, other.clean_moment),
                             (self.target_moment, other.target_moment)):
            order += [torch.arange(start, start + len(mine), device=gram.device),
                      torch.arange(other_start, other_start + len(theirs), device=gram.device)]
            start, other_start = start + len(mine), other_start + len(theirs)
        order = torch.cat(order)
        return torch.cat([keys, other_keys])[order], block[order][:, order]

    def add_trigger(self, sums: dict[str, Tensor | KeyRows]) -> None:
        """Add another trigger's :meth:`triggered_sums` on the same images to this problem's, in place (the clean
        sums are counted once); the moments are summed into their own tensors, with no new d x d allocation."""
        for name in TRIGGERED_SUMS:
            mine = getattr(self, name)
            if isinstance(mine, Tensor):
                mine.add_(sums[name])
            else:
                setattr(self, name, mine + sums[name])

    @property
    def factored(self) -> bool:
        """Whether the sums are held as keys (:class:`~lightning_backdoor.defenses.editing.KeyRows`)."""
        return isinstance(self.triggered_moment, KeyRows)

    def solve(self, method: str, strength: float, rank: int, repair_weight: float = 0.0,
              protected: Tensor | None = None, ridge: float = 1e-4) -> Tensor:
        """ΔW (c_out, d), float32. The repair's two forms: ``repair_weight`` pins the target class's clean keys to
        their original values; ``protected`` (d, k), orthonormal directions of the target class's keys, keeps ΔW out
        of them exactly (ΔW P = 0; closed form only). ``ridge``: ε of the preserved moment's C + ε I, a fraction of
        its mean eigenvalue.

        Raises:
            ValueError: no triggered keys; for a factored problem, another method than ``closed_form``, a prior or
                ``protected``.
        """
        if self.triggered_count <= 0:
            raise ValueError("the unseen split holds no non-target images to edit with")
        if self.factored:
            if method != "closed_form" or self.prior_weight > 0 or protected is not None:
                raise ValueError("a problem held as keys is solved in closed form, without a prior or a protected "
                                 "subspace")
            return self._solve_in_key_space(strength, repair_weight, ridge)
        clean = self.clean_moment / self.clean_count
        if self.prior_weight > 0:
            preserve = (1 - self.prior_weight) * clean + self.prior_weight * self.prior
        else:
            preserve = ledoit_wolf(clean, self.clean_fourth / self.clean_count, self.clean_count)
        if repair_weight > 0 and self.target_count > 0:
            preserve = preserve + repair_weight * self.target_moment / self.target_count
        moment, residual = self.triggered_moment / self.triggered_count, self.residual_moment / self.triggered_count
        if protected is not None:
            return protected_edit(moment, residual, preserve, strength, protected, ridge)
        if method == "closed_form":
            return closed_form_edit(moment, residual, preserve, strength, ridge)
        return rank_r_edit(moment, residual, preserve, rank, strength, ridge)

    @functools.cached_property
    def _key_space(self) -> tuple[Tensor, Tensor]:
        """The stacked keys [A's; C's; T's] (m, d) and their Gram matrix (m, m) in float64, once per problem."""
        keys = torch.cat([self.triggered_moment.rows, self.clean_moment.rows, self.target_moment.rows])
        exact = keys.double()
        return keys, exact @ exact.T

    def _solve_in_key_space(self, strength: float, repair_weight: float, ridge: float) -> Tensor:
        """:meth:`solve`'s closed form with the Ledoit–Wolf shrinkage and the pin repair, for a factored problem:
        the same system, solved by :func:`~lightning_backdoor.defenses.editing.key_space_edit`."""
        keys, gram = self._key_space
        size = keys.shape[1]
        triggered, clean = len(self.triggered_moment), len(self.clean_moment)
        triggered_count, clean_count = self.triggered_count.double(), self.clean_count.double()
        clean_gram = gram[triggered:triggered + clean, triggered:triggered + clean]
        clean_trace = clean_gram.diagonal().sum() / clean_count
        intensity, mean_eigenvalue = shrinkage(clean_trace, clean_gram.square().sum() / clean_count ** 2,
                                               self.clean_fourth.double() / clean_count, clean_count, size)
        pin = float(repair_weight) if repair_weight > 0 and self.target_count > 0 else 0.0
        target_count = self.target_count.double().clamp(min=1)
        trace = (intensity * mean_eigenvalue * size + (1 - intensity) * clean_trace
                 + pin * gram[triggered + clean:, triggered + clean:].diagonal().sum() / target_count)
        identity = intensity * mean_eigenvalue + ridge * trace.clamp(min=1e-12) / size
        first = torch.full((triggered,), 1.0, dtype=torch.float64, device=gram.device)
        scales = torch.cat([first / triggered_count.sqrt(),
                            ((1 - intensity) / clean_count).sqrt().expand(clean),
                            (pin / target_count).sqrt().expand(len(self.target_moment))])
        return key_space_edit(triggered, self.residual_moment.rows / triggered_count.sqrt().float(), gram, scales,
                              keys, identity.item(), strength)

    def diagnostics(self, delta: Tensor) -> dict[str, float]:
        """How far triggered keys sit from their clean values before/after (relative), and how much clean outputs
        moved (relative), from the sums alone."""
        count = self.triggered_count
        # E‖r − Δk‖² = E‖r‖² − 2 tr(Δ Rᵀ) + tr(Δ A Δᵀ)
        if self.factored:
            moved = self.triggered_moment.rows @ delta.T  # Δ √w k*, paired with R's rows √w r
            after = self.residual_energy - 2 * (self.residual_moment.rows * moved).sum() + moved.square().sum()
            clean_rows = self.clean_moment.rows
            clean_change = (clean_rows @ delta.T).square().sum() / (
                clean_rows @ self.weight.T).square().sum().clamp(min=1e-12)
        else:
            after = self.residual_energy - 2 * (delta * self.residual_moment).sum() + (
                (delta @ self.triggered_moment) * delta).sum()
            clean_change = ((delta @ self.clean_moment) * delta).sum() / (
                (self.weight @ self.clean_moment) * self.weight).sum().clamp(min=1e-12)
        scale = self.target_energy.clamp(min=1e-12)
        return {"triggered_residual_before": (self.residual_energy / scale).sqrt().item(),
                "triggered_residual_after": (after.clamp(min=0) / scale).sqrt().item(),
                "clean_output_change": clean_change.sqrt().item(), "num_triggered_keys": round(count.item())}


@dataclass
class EditFit:
    """The edit fitted on U, before any weight changes: the chosen layer and strength, the key statistics of both
    folds of U (``fold_problems``) and their sum (``problem``), the (augmented) unseen images with labels and fold
    of each, the target class, the facts so far (``info``), the folds of the repair's signal with their
    statistics (the same folds, except the views of a target class's single image: they alternate), the
    unedited model's target-class probability on each target-class image (in image order), each trigger with
    its triggered images (:class:`Triggered`), and the held-out passes' shortcut (:class:`SuffixPasses`) when
    built; ``fold_edits``: the unrepaired edits fitted on fold 0 and on fold 1 at the chosen layer and strength, kept
    from the cross-validation when the signal's folds are its folds (the repair's signal then reuses them)."""

    layer: str
    strength: float
    problem: EditProblem
    fold_problems: list[EditProblem]
    images: Tensor
    labels: Tensor
    folds: Tensor
    target_class: int
    info: dict[str, Any]
    signal_folds: Tensor
    signal_problems: list[EditProblem]
    target_probability: Tensor
    triggered: list[Triggered]
    passes: SuffixPasses | None = None
    fold_edits: tuple[Tensor, Tensor] | None = None


@DEFENSES.register("editing")
class ActivationEditing(Defense):
    """Edit one late layer so triggered activations map to clean ones; then repair the target class if it dropped.

    Args:
        layer: the layer to edit (e.g. ``blocks.2.conv1``), or ``auto``: try the last ``candidates`` editable
            layers (of the model's ``edit_candidates`` where it declares them, e.g. the ``vit``'s last blocks' MLP
            layers; of the last blocks' MLP layers on a timm ViT, with or without LayerScale) and keep, of those
            whose cross-validated loss on the unseen split is within one standard error of the lowest, the deepest
            (:func:`one_standard_error_choice`).
        method: ``closed_form`` (multi-key least squares) or ``rank_r`` (constrained low-rank edit).
        strength: λ, the weight of keeping clean keys' values against mapping triggered keys to clean values;
            ``None`` picks it from 0.3 … 100 by the same cross-validation on U as ``layer: auto``.
        rank: r of the ``rank_r`` edit.
        min_images: augment U with seeded crop/flip views of every image until it holds at least this many images
            (1 image per class becomes 4 views; 5 or more per class on CIFAR-10 stay as they are). With ``repair``
            and a single unseen image of the target class, at least 2 views of every image, whatever the count:
            the repair's signal holds out views of that image, and a fold without any has nothing to repair with.
        spatial_weight: ``uniform`` over the feature grid, or ``mask``: the trigger's mask pooled to the grid
            (local triggers only; global triggers fall back to uniform).
        repair: run the repair step when the edit hurts the target class. Its signal is cross-fitted on U: the
            edit fitted on one fold of U, the drop of the mean target-class probability on the *other* fold's
            target-class images (whose keys that edit never saw), both directions averaged.
        repair_tolerance: the signal's drop above which the repair fires (a negative value always repairs).
        repair_method: ``pin``: add the target class's keys to the preserved ones with a weight (the first of
            ``repair_weights`` whose cross-fitted drop is within the tolerance); ``protect``: keep the edit out of
            the subspace holding ``repair_energies`` of the target keys' energy (the first within tolerance). A
            setting must also pass a guard: the cross-fitted target confidence of the held-out folds' triggered
            non-target images may rise by at most the tolerance and by no more than the repair won back
            (:meth:`choose_repair`). When no setting
            qualifies, the edit stays unrepaired (the report says so).
        repair_weights: the pin weights the repair tries, in order.
        repair_energies: the energy fractions ``protect`` tries, in order.
        candidates: how many of the last editable layers ``auto`` tries.
        seed: an integer in [0, 2**63); fixes the augmented views (and the trigger estimation's streams).
        bf16: run the model under bfloat16 autocast while collecting keys and checking the edit on U, and multiply
            the key moments in bfloat16 (float32 sums; docs/results/edit-cost.md measures the error and its effect);
            the edit itself is solved and applied in float32.
        chunk_size: images whose keys are held at once; the moments are summed chunk by chunk, so their memory
            does not grow with the number of unseen images. Where U's keys at a layer are at most as many as its key
            width d (few images, or a wide layer), the keys themselves are kept (float32) and the edit is solved
            from their Gram matrix in float64 (:data:`KEY_SPACE_RATIO`; the report's ``system`` says which form
            ran): the same edit, without any d x d matrix.
        batchnorm_prior: w in [0, 1]: the preserved key moment becomes (1 − w) C + w P, P the keys' moment when
            the output of the BatchNorm feeding the edited layer is drawn from its learnt N(β, γ²)
            (:func:`~lightning_backdoor.defenses.prior.batchnorm_key_prior`), instead of C shrunk towards the
            identity (Ledoit–Wolf; w = 0, the default). For one or a few unseen images per class (it cost WaNet
            1.4–2.7 pt of ASR); a layer no BatchNorm feeds alone is refused, ``auto`` keeps the candidates one
            does. ``None``: pick w from 0, 0.25, 0.5 by the same cross-validation on U as ``layer: auto`` (w = 0
            only at layers no BatchNorm feeds alone; nothing is refused). Measured: docs/results/cifar10.md,
            "A BatchNorm prior for the preserved keys".
        mirror: also map each trigger's mirror image (:class:`~lightning_backdoor.triggers.Mirrored`, flipped
            left-right) to clean values. A model trained with random horizontal flips learns it besides the trigger:
            on the CIFAR-10 BadNets model an edit with the given trigger alone left the mirrored patch at 94 % ASR.
            ``None``: when, before the edit, it sends at least :data:`MIRROR_SUCCESS` of U's non-target images
            (at most :data:`SUCCESS_IMAGES` of them, a seeded random subset) to the target class (the report's
            ``mirrored_triggers`` says what it measured and did; ``success_checked_images`` on how many); ``True``: always;
            ``False``: never. Feature-space triggers and triggers that are their own mirror image are not mirrored.
        shift: pixels a random crop of the model's training may have moved the trigger by, smaller than the image;
            ``None``: 1/8 of the image's width, at least 1 (4 px on 32 x 32, the padding of the field's CIFAR
            crop). The edit also maps each local trigger (its mask averages at most
            :data:`~lightning_backdoor.triggers.augmented.LOCAL_TRIGGER` over the image), and each mirror image it
            adds, moved by this many pixels along each axis and both (:class:`~lightning_backdoor.triggers.Shifted`;
            up to 8 moves, those that leave it unchanged or move it wholly out of the image skipped) where, before
            the edit, the move sends at least :data:`MIRROR_SUCCESS` of U's non-target images (as for ``mirror``)
            to the target class (the report's ``shifted_triggers``). On the CIFAR-10 BadNets model an edit without the moves left the
            patch moved 4 px inward at 9 % ASR (floor 2 %); moves of 4 px also removed those of 2
            (docs/results/cifar10.md). Of several triggers (an estimate's candidates) only the first, the main
            candidate, is moved: on that model, trigger unknown, its moves took the patch moved 4 px from 2.6-6.0 %
            to 2.6-2.9 % (floor 1.9 %) for 1.6-2.2 s more, where moving all of them took 101 s. ``0``: no moves.

    Needs the trigger and target (:class:`BackdoorKnowledge`); without them, compose it with a trigger estimator:
    ``EstimateFirst(ActivationEditing(), TriggerEstimator())`` (what ``trigger_known=false`` does).
    """

    requires_knowledge = True

    def __init__(self, layer: str = "auto", method: Literal["closed_form", "rank_r"] = "closed_form",
                 strength: float | None = 10.0, rank: int = 16, min_images: int = 40,
                 spatial_weight: Literal["uniform", "mask"] = "uniform", repair: bool = True,
                 repair_tolerance: float = REPAIR_TOLERANCE, repair_method: Literal["pin", "protect"] = "pin",
                 repair_weights: tuple[float, ...] = REPAIR_WEIGHTS,
                 repair_energies: tuple[float, ...] = REPAIR_ENERGIES, candidates: int = 3, seed: int = 0,
                 bf16: bool = False, chunk_size: int = 500, batchnorm_prior: float | None = 0.0,
                 mirror: bool | None = None, shift: int | None = None) -> None:
        if strength is not None and not _positive(strength):
            raise ValueError(f"strength={strength!r} must be a positive number, or None/null (chosen on the unseen "
                             f"split)")
        for name, value in (("rank", rank), ("candidates", candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 0:
            raise ValueError(f"min_images={min_images!r} must be an integer >= 0")
        if isinstance(repair_tolerance, bool) or not isinstance(repair_tolerance, (int, float)) \
                or not math.isfinite(repair_tolerance):
            raise ValueError(f"repair_tolerance={repair_tolerance!r} must be a finite number (a negative value "
                             f"always repairs)")
        if not repair_weights or not all(_positive(weight) or weight == 0 for weight in repair_weights):
            raise ValueError(f"repair_weights={repair_weights!r} must be one or more numbers >= 0 (pin weights)")
        if not repair_energies or not all(_positive(energy) and energy <= 1 for energy in repair_energies):
            raise ValueError(f"repair_energies={repair_energies!r} must be one or more fractions in (0, 1] (of the "
                             f"target keys' energy)")
        unused = {name: value for name, value, default in (
            ("repair_tolerance", repair_tolerance, REPAIR_TOLERANCE), ("repair_method", repair_method, "pin"),
            ("repair_weights", tuple(repair_weights), REPAIR_WEIGHTS),
            ("repair_energies", tuple(repair_energies), REPAIR_ENERGIES)) if value != default}
        if not repair and unused:
            settings = ", ".join(f"{name}={value!r}" for name, value in unused.items())
            raise ValueError(f"repair=false, but {settings} is set: repair settings do nothing without the repair; "
                             f"drop them or set repair=true")
        self.layer, self.method, self.strength, self.rank, self.min_images = layer, method, strength, rank, min_images
        self.spatial_weight, self.repair, self.repair_tolerance = spatial_weight, repair, repair_tolerance
        if repair_method not in ("pin", "protect"):
            raise ValueError(f"repair_method={repair_method!r}; choose pin or protect")
        if repair_method == "protect" and method != "closed_form":
            raise ValueError("repair_method=protect needs method=closed_form")
        self.repair_method = repair_method
        self.repair_weights, self.repair_energies = tuple(repair_weights), tuple(repair_energies)
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 image")
        check_seed(seed, " (it also seeds the trigger estimation when the trigger is unknown)")
        if batchnorm_prior is not None and (isinstance(batchnorm_prior, bool)
                                            or not isinstance(batchnorm_prior, (int, float))
                                            or not 0 <= batchnorm_prior <= 1):
            raise ValueError(f"batchnorm_prior={batchnorm_prior!r} must be a weight in [0, 1] (0: no prior) or "
                             f"None/null (chosen on the unseen split)")
        self.batchnorm_prior = None if batchnorm_prior is None else float(batchnorm_prior)
        self.candidates, self.seed, self.bf16, self.chunk_size = candidates, seed, bf16, chunk_size
        if mirror is not None and not isinstance(mirror, bool):
            raise ValueError(f"mirror={mirror!r} must be true, false or null (when it works on the unseen split)")
        self.mirror = mirror
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, int) or shift < 0):
            raise ValueError(f"shift={shift!r} must be an integer number of pixels >= 0 (0: the trigger is not "
                             f"moved) or None/null (1/8 of the image's width)")
        self.shift = shift

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        """Edit (and repair) ``model`` in place; several triggers (estimated candidates of one backdoor) are all
        mapped to clean values by one edit, their key statistics summed. The result's ``stages`` hold the edited
        layer before the repair (``after_edit``) when the repair changed it.

        Raises:
            ValueError: (one line) no knowledge, a wrong layer name, a feature-space trigger after the layer,
                (with ``repair``) no unseen image of the target class, or (with a ``batchnorm_prior`` weight > 0)
                a layer no BatchNorm feeds alone (:meth:`candidate_layers`).
        """
        knowledge = self.require(knowledge)
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            fit = self.fit(model, unseen, knowledge)
            layer, info = fit.layer, fit.info
            delta = fit.problem.solve(self.method, fit.strength, self.rank)
            info["diagnostics"] = fit.problem.diagnostics(delta)
            repair = None
            if self.repair:
                signal = self.target_drop(model, fit)
                info["repair_signal"] = {**signal, "drop": round(signal["drop"], 4)}
                if signal["drop"] > self.repair_tolerance or self.repair_tolerance < 0:  # < 0: forced, whatever it is
                    info["repair"] = self.choose_repair(model, fit, signal["drop"])
                    repair = info["repair"] if info["repair"]["setting"] is not None else None
            add_delta(model, layer, delta)
            info["edit_seconds"] = time.perf_counter() - start
            edited_state = {f"{layer}.{key}": value.clone()
                            for key, value in get_layer(model, layer).state_dict().items()}
            if repair is not None:
                repaired_delta = fit.problem.solve(self.method, fit.strength, self.rank,
                                                   **self._repair_arguments(fit.problem, repair["setting"]))
                add_delta(model, layer, repaired_delta - delta)
                info["diagnostics_after_repair"] = fit.problem.diagnostics(repaired_delta)
            return DefenseResult(method=f"editing/{self.method}", seconds=time.perf_counter() - start, layer=layer,
                                 stages={"after_edit": edited_state} if repair is not None else {},
                                 repaired=repair is not None, details=info)
        finally:
            model.train(was_training)

    def check_model(self, model: nn.Module, images: Tensor) -> None:
        """The layer (a name of ``model``'s editable layers, or the ``auto`` candidates), with a
        ``batchnorm_prior`` weight > 0 a BatchNorm feeding it alone (:meth:`candidate_layers`), and a ``shift``
        smaller than the images.

        Raises:
            ValueError: (one line) as :meth:`candidate_layers` refuses, or a ``shift`` as large as the images.
        """
        self._shift_distance(images)
        self.candidate_layers(model, images.float())

    def candidate_layers(self, model: nn.Module, images: Tensor) -> list[str]:
        """The layers the edit may choose from: ``layer``, or the ``auto`` candidates; with ``batchnorm_prior``
        only those a BatchNorm feeds alone (:func:`~lightning_backdoor.defenses.prior.feeding_batchnorm`; ``auto``
        drops the others). ``images``: a few unseen images (N, C, H, W).

        Raises:
            ValueError: (one line) an unknown or unsupported layer, a declared ``residual_norm`` that is no
                per-channel scale, a block whose output is not the activated sum its residual declaration says
                (:func:`~lightning_backdoor.defenses.activations.check_residual_sums`); with a ``batchnorm_prior``
                weight > 0, a named
                layer no BatchNorm feeds alone, or no such ``auto`` candidate (``None`` refuses neither).
        """
        layers = auto_candidates(model, self.candidates, images[:1]) if self.layer == "auto" else [self.layer]
        for name in layers:
            get_layer(model, name)  # a wrong name or type fails before any work
            residual_branch_of(model, name)  # so does a declared residual_norm the correction cannot read
        check_residual_sums(model, layers, images[:2])  # and a block whose skip term is not where it says
        if not self.batchnorm_prior:  # 0: no prior; None: chosen per layer, w = 0 where no BatchNorm feeds it
            return layers
        usable = []
        for name in layers:
            try:
                feeding_batchnorm(model, name, images[:2])
            except ValueError:
                if self.layer != "auto":
                    raise
            else:
                usable.append(name)
        if not usable:
            raise ValueError(f"batchnorm_prior: no BatchNorm alone feeds any of the auto candidates {layers}; name a "
                             f"layer that one does (e.g. a block's second conv) or set batchnorm_prior=0 (or null)")
        return usable

    def fit(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge) -> EditFit:
        """Collect the key statistics on U and choose the layer, the strength and (``batchnorm_prior=None``) the
        prior's weight; ``model`` (in eval mode) is unchanged.

        Raises:
            ValueError: see :meth:`defend`.
        """
        target_class = knowledge.target_class
        triggers, mirrors, shifts = self._augmented(model, list(knowledge.triggers), unseen, target_class)
        layers = self._layers_reached(model, self.candidate_layers(model, unseen.images[:2].float()), triggers)
        if self.repair and not (unseen.labels == target_class).any():
            raise ValueError(f"repair needs unseen images of the target class {target_class}; the unseen split has "
                             f"none (add unseen images or set repair=false)")
        views = max(1, -(-self.min_images // len(unseen.labels)))
        if self.repair and int((unseen.labels == target_class).sum()) == 1:
            views = max(views, 2)  # the repair's signal folds split the single target image's views (_signal_folds)
        images, labels = augmented_views(unseen.images.float(), unseen.labels, views, self.seed)
        info: dict[str, Any] = {"num_unseen": len(unseen.labels), "views": views, "bf16": self.bf16}
        if mirrors:
            info["mirrored_triggers"] = mirrors
        if shifts:
            info["shifted_triggers"] = shifts
        if any(fact["success_on_unseen"] is not None for fact in mirrors + shifts):
            info["success_checked_images"] = min(SUCCESS_IMAGES, int((unseen.labels != target_class).sum()))
        folds = self._folds(labels, views)
        signal_folds = self._signal_folds(labels, folds, views, target_class)
        # the statistics are additive: both fold sets are sums of (CV fold, signal fold) pieces; the pieces that
        # hold images (two when the fold sets agree, three with a single target image) are built, no more
        parts = sorted({(0, 0), (1, 1), *zip(folds.tolist(), signal_folds.tolist())})
        added = self._added_rows(labels, target_class) if len(triggers) > len(knowledge.triggers) else None
        if added is not None:
            info["added_trigger_images"] = len(added)
        triggered = [Triggered(member, member(images)) if index < len(knowledge.triggers) or added is None
                     else Triggered(member, member(images[added]), added)
                     for index, member in enumerate(triggers)]  # applied once, reused by the CV
        keys, clean_keys = self._key_counts(model, layers, labels, triggered, target_class, images[:1])
        available = available_memory()  # read once: the prior and the memory check see the same figure
        fixed_prior = self.batchnorm_prior is not None and self.batchnorm_prior > 0
        if fixed_prior:  # every layer gets a prior, so d x d moments: skip or refuse those that do not fit first
            layers = self._within_memory(model, layers, keys, {}, info, available)
        priors = self._priors(model, layers, unseen.images.float(), available)
        factored = {name: count for name, count in keys.items() if name in layers and name not in priors
                    and self.method == "closed_form" and self.repair_method == "pin"
                    and 0 < count <= KEY_SPACE_RATIO * self._width(model, name)}
        if not fixed_prior:
            layers = self._within_memory(model, layers, keys, factored, info, available)
        # bf16: the moments of fewer clean keys than the width, rounded to bfloat16, make an indefinite system (a
        # jitter ladder of d x d factorisations, and a weaker edit): those layers' products are taken in float32
        exact = {name for name in layers if self.bf16 and name not in factored
                 and clean_keys[name] < self._width(model, name)}
        masks = [member.mask(tuple(images.shape[1:])) if self.spatial_weight == "mask" else None
                 for member in triggers]
        problems: dict[str, list[EditProblem]] = {}
        logits = []
        # several options to score on U: the held-out passes' shortcut records what it needs during these passes
        scored = len(layers) > 1 or self.strength is None or self.batchnorm_prior is None
        passes = self._suffix_passes(model, layers, available) if scored else None

        def add_sums(index: int, rows: Tensor, clean: dict[str, LayerActivations], scale: float = 1.0) -> None:
            """The ``index``-th trigger's sums over the images ``rows`` (of ``images``; ``clean``: their clean
            activations) added to the pieces (the first trigger's bring the clean sums)."""
            member, mask = triggered[index], masks[index]
            with member.trigger.attached(model), recording(passes, _image_space(member.trigger, index)):
                triggered_acts = capture(model, layers, member.images[rows] if member.rows is None else member.images,
                                         bf16=self.bf16)
            subsets = [(folds[rows] == cv) & (signal_folds[rows] == signal) for cv, signal in parts]
            for name in layers:
                acts = (_float32(clean[name]) if name in exact else clean[name],
                        _float32(triggered_acts[name]) if name in exact else triggered_acts[name],
                        labels[rows], target_class, self._grid_weights(mask, clean[name], scale))
                if index == 0:
                    pieces = [EditProblem.build(get_layer(model, name), *acts, subset, name in factored)
                              for subset in subsets]
                    problems[name] = [a + b for a, b in zip(problems[name], pieces)] if name in problems else pieces
                else:  # the pieces' sums are their own (built, or added up, for this layer)
                    for problem, subset in zip(problems[name], subsets):
                        problem.add_trigger(EditProblem.triggered_sums(*acts, subset, name in factored))

        added_clean: dict[str, list[LayerActivations]] = {name: [] for name in layers}
        for chunk in torch.arange(len(images)).split(self.chunk_size):  # keys of one chunk at a time: flat memory
            with recording(passes, "clean"):
                clean_acts, chunk_logits = capture_with_logits(model, layers, images[chunk], bf16=self.bf16)
            logits.append(chunk_logits)
            for index, member in enumerate(triggered):
                if member.rows is None:
                    add_sums(index, chunk, clean_acts)
            if added is not None:  # the added triggers' images: their clean activations kept for one pass each
                local = added[(added >= chunk[0]) & (added <= chunk[-1])] - chunk[0]
                for name in layers:
                    added_clean[name].append(clean_acts[name].select(local))
        if added is not None:  # each trigger added on its images: one pass, its sums scaled up to all
            clean_of_added = {name: LayerActivations.cat(parts) for name, parts in added_clean.items()}
            for index, member in enumerate(triggered):
                if member.rows is not None:
                    add_sums(index, added, clean_of_added, self._added_scale(labels, target_class, added))
        weights = PRIOR_WEIGHTS if self.batchnorm_prior is None else (self.batchnorm_prior,)
        pieces_of = {(name, weight): {part: replace(piece, prior=priors[name][0], prior_weight=weight) if weight > 0
                                      else piece for part, piece in zip(parts, pieces)}
                     for name, pieces in problems.items() for weight in (weights if name in priors else (0.0,))}
        strengths = STRENGTHS if self.strength is None else (self.strength,)
        options = [(name, weight, strength) for name, weight in pieces_of for strength in strengths]
        fold_problems = {option: self._fold_sums(pieces, 0) for option, pieces in pieces_of.items()}  # once: every
        # strength reuses them (and the key space's Gram matrix each caches)
        choice = options[0]
        if passes is not None:
            passes.finish("clean", images, torch.cat(logits))
            for index, member in enumerate(triggered):
                if _image_space(member.trigger, index) is not None:
                    passes.finish(_image_space(member.trigger, index), member.images)
            info["held_out_passes"] = "suffix" if passes.active else f"whole ({passes.reason})"
        fold_edits: dict[str, tuple[tuple[str, float, float], tuple[Tensor, Tensor]]] = {}  # per layer: of its
        # lowest loss so far (the one-standard-error rule chooses one of these)
        if len(options) > 1:
            scores = {}
            for option in options:
                name, weight, strength = option
                loss, error, edits = self._cross_validate(model, name, fold_problems[name, weight], strength, images,
                                                          triggered, labels, folds, target_class, passes)
                scores[option] = (loss, error)
                if name not in fold_edits or loss < scores[fold_edits[name][0]][0]:
                    fold_edits[name] = (option, edits)
            choice, within = one_standard_error_choice(scores, layers)
            label = lambda name, weight, strength: (f"{name} λ={strength}"  # noqa: E731
                                                    + (f" w={weight:g}" if self.batchnorm_prior is None else ""))
            info["selection"] = {"cross_validated_loss_on_unseen": {label(*option): round(score, 4)
                                                                    for option, (score, _) in scores.items()},
                                 "triggered_loss": self._triggered_loss(labels, folds, target_class)}
            if len({name for name, _, _ in options}) > 1:
                best = min(scores, key=lambda option: scores[option][0])
                info["selection"] |= {"lowest": label(*best), "standard_error": round(scores[best][1], 4),
                                      "layers_within_one_standard_error": within}
        layer, weight, strength = choice
        info["strength"] = strength
        info["system"] = ({"form": "key_space", "size": factored[layer]} if layer in factored
                          else {"form": "moments", "size": self._width(model, layer)})
        if self.batchnorm_prior != 0:
            info["batchnorm_prior"] = {"weight": weight, "chosen_on_unseen": self.batchnorm_prior is None,
                                       "norm": priors[layer][1] if weight > 0 else None,
                                       "norms": {name: norm for name, (_, norm) in priors.items()}}
        pieces = pieces_of[layer, weight]
        target_probability = torch.cat(logits)[labels == target_class].softmax(-1)[:, target_class]
        return EditFit(layer, strength, functools.reduce(operator.add, pieces.values()), fold_problems[layer, weight],
                       images, labels, folds, target_class, info, signal_folds, self._fold_sums(pieces, 1),
                       target_probability, triggered, passes,
                       fold_edits[layer][1] if fold_edits.get(layer, (None,))[0] == choice
                       and torch.equal(signal_folds, folds) else None)

    @torch.no_grad()
    def _augmented(self, model: nn.Module, triggers: list[Trigger], unseen: UnseenData, target_class: int
                   ) -> tuple[list[Trigger], list[dict[str, Any]], list[dict[str, Any]]]:
        """``triggers`` and the images of them a training augmentation shows that ``mirror`` and ``shift`` add: the
        mirror images, then the moves of the first trigger and of its mirror image. What was measured and done, per
        mirror image: ``trigger`` (its index in ``triggers``: the knowledge's order), ``success_on_unseen`` (the
        fraction of U's non-target images (at most :data:`SUCCESS_IMAGES` of them: :meth:`_checked_images`) it sends
        to ``target_class`` before the edit; ``None`` when ``mirror``
        decides without it) and ``included``; per move the same, with ``mirrored`` (whether it moves the trigger's
        mirror image) and ``shift`` ([dy, dx] in pixels)."""
        attacked = self._checked_images(unseen, target_class)
        mirrors, added, mirrored_from = [], [], []
        for index, trigger in enumerate(triggers):
            mirrored = None if self.mirror is False else distinct_mirror(trigger, attacked)
            if mirrored is None:
                continue  # a feature-space trigger, or its own mirror image
            success = None if self.mirror else self._success(model, mirrored, attacked, target_class)
            included = success is None or success >= MIRROR_SUCCESS
            mirrors.append({"trigger": index, "success_on_unseen": success, "included": included})
            if included:
                added.append(mirrored)
                mirrored_from.append(index)
        shifts, moved = [], []
        # only the first trigger (an estimate's main candidate) and its mirror image, when added, are moved: the
        # moves of every candidate would multiply the edit's triggers and seconds
        distance = self._shift_distance(unseen.images)
        first = [(False, triggers[0])] + [(True, mirror) for index, mirror in zip(mirrored_from, added) if index == 0]
        for is_mirror, trigger in first:
            for shifted in distinct_shifts(trigger, distance, attacked):
                success = self._success(model, shifted, attacked, target_class)
                included = success >= MIRROR_SUCCESS
                shifts.append({"trigger": 0, "mirrored": is_mirror, "shift": list(shifted.shift),
                               "success_on_unseen": success, "included": included})
                if included:
                    moved.append(shifted)
        return triggers + added + moved, mirrors, shifts

    def _checked_images(self, unseen: UnseenData, target_class: int) -> Tensor:
        """U's non-target images (M, C, H, W) the success checks run on: all of them when there are at most
        :data:`SUCCESS_IMAGES`, else that many drawn without replacement with ``seed`` (kept in U's order)."""
        attacked = unseen.images[unseen.labels != target_class].float()
        if len(attacked) <= SUCCESS_IMAGES:
            return attacked
        chosen = torch.randperm(len(attacked), generator=torch.Generator().manual_seed(self.seed))[:SUCCESS_IMAGES]
        return attacked[chosen.sort().values.to(attacked.device)]

    def _shift_distance(self, images: Tensor) -> int:
        """The pixels ``shift`` moves a trigger by on ``images`` (N, C, H, W); for ``shift=None``
        :func:`~lightning_backdoor.triggers.crop_distance` (0 where there is no room, or the inputs are not images).

        Raises:
            ValueError: a ``shift`` not smaller than the images.
        """
        if self.shift is None or images.dim() != 4:
            return crop_distance(images)
        if self.shift >= min(images.shape[-2:]):
            raise ValueError(f"shift={self.shift} must be smaller than the unseen images' "
                             f"{images.shape[-2]}x{images.shape[-1]} pixels")
        return self.shift

    @torch.no_grad()
    def _success(self, model: nn.Module, trigger: Trigger, attacked: Tensor, target_class: int) -> float:
        """The fraction of ``attacked`` (U's non-target images) ``trigger`` sends to ``target_class``, to 4 places."""
        with torch.autocast(attacked.device.type, torch.bfloat16, enabled=self.bf16):
            hits = sum(int((logits_of(model(trigger(batch))).argmax(-1) == target_class).sum())
                       for batch in attacked.split(self.chunk_size))
        return round(hits / len(attacked), 4)

    def target_drop(self, model: nn.Module, fit: EditFit, setting: float | None = None) -> dict[str, Any]:
        """The repair's signal, cross-fitted on U: for each fold holding target-class images, the edit fitted on the
        other fold (repaired with ``setting``, a pin weight or an energy, when given) is applied, and the mean
        target-class probability of the held-out target images is compared before and after; ``drop`` is the
        difference over all of them (0 without any), ``validated``: whether the fitting fold held target keys to
        repair with; ``held_out_target_images`` counts distinct unseen images, ``held_out_target_views`` their
        augmented views measured. ``model`` is left unchanged."""
        before, after, held, validated = [], [], [], True
        target = fit.labels == fit.target_class
        for held_out in (0, 1):
            check = (fit.signal_folds == held_out) & target
            if not check.any():
                continue
            delta, fitted_with_target = self._fold_edit(fit, held_out, setting)
            validated = validated and fitted_with_target
            before.append(fit.target_probability[fit.signal_folds[target] == held_out])  # computed once, in fit
            held.append(check.nonzero().flatten())
            with trial_edit(model, fit.layer, delta):
                logits = self._held_out(model, fit.passes, fit.layer, "clean", fit.images, check)
                after.append(logits.softmax(-1)[:, fit.target_class])
        if not before:
            return {"drop": 0.0, "held_out_target_images": 0, "held_out_target_views": 0, "validated": False}
        mean_before, mean_after = torch.cat(before).mean().item(), torch.cat(after).mean().item()
        views = torch.cat(held)  # the views of image i sit at i, i + count, i + 2 count, ... (augmented_views)
        count = len(fit.labels) // fit.info["views"]
        return {"target_confidence_before": round(mean_before, 4), "target_confidence_after": round(mean_after, 4),
                "drop": mean_before - mean_after, "held_out_target_images": (views % count).unique().numel(),
                "held_out_target_views": len(views), "validated": validated}

    def triggered_confidence(self, model: nn.Module, fit: EditFit, setting: float | None = None) -> float:
        """The repair's guard, cross-fitted as :meth:`target_drop`: the mean target-class probability of the
        held-out fold's triggered non-target images (every trigger of the knowledge, averaged) under the edit fitted
        on the other fold (repaired with ``setting`` when given). A repair that raises it gives the backdoor back
        (the triggered keys of a backdoored model resemble the target class's, which the repair preserves).
        ``model`` is left unchanged."""
        total, count = 0.0, 0
        for held_out in (0, 1):
            attacked = (fit.signal_folds == held_out) & (fit.labels != fit.target_class)
            if not attacked.any():
                continue
            delta, _ = self._fold_edit(fit, held_out, setting)
            confidences = []
            with trial_edit(model, fit.layer, delta):
                for index, member in enumerate(fit.triggered):
                    with member.trigger.attached(model):
                        logits = self._held_out(model, fit.passes, fit.layer, f"trigger {index}", member.images,
                                                member.of(attacked))
                    confidences.append(logits.softmax(-1)[:, fit.target_class])
            total += self._per_image_mean(fit.triggered, confidences, attacked).sum().item()
            count += int(attacked.sum())
        return total / max(count, 1)

    @staticmethod
    def _per_image_mean(triggered: list[Triggered], values: list[Tensor], attacked: Tensor) -> Tensor:
        """Per image of ``attacked`` (a boolean mask over the edit's images), the mean of ``values`` (one per
        trigger of ``triggered``, over its images that ``attacked`` selects) over the triggers applied to it."""
        if all(member.rows is None for member in triggered):
            return torch.stack(values).mean(0)
        device, size = attacked.device, int(attacked.sum())
        position = torch.full((len(attacked),), -1, dtype=torch.long, device=device)
        position[attacked] = torch.arange(size, device=device)
        total, count = torch.zeros(size, device=device), torch.zeros(size, device=device)
        for member, value in zip(triggered, values):
            where = member.of(position)[member.of(attacked)]
            total.index_add_(0, where, value.float())
            count.index_add_(0, where, torch.ones(len(where), device=device))
        return total / count

    def _fold_edit(self, fit: EditFit, held_out: int, setting: float | None) -> tuple[Tensor, bool]:
        """The edit fitted on the signal fold other than ``held_out`` (repaired with ``setting`` when given), and
        whether that fold held target keys to repair with."""
        problem = fit.signal_problems[1 - held_out]
        if setting is None and fit.fold_edits is not None:  # solved by the cross-validation already
            return fit.fold_edits[1 - held_out], True
        arguments = {} if setting is None else self._repair_arguments(problem, setting)
        return (problem.solve(self.method, fit.strength, self.rank, **arguments),
                setting is None or problem.target_count.item() > 0)

    def choose_repair(self, model: nn.Module, fit: EditFit, drop: float | None = None) -> dict[str, Any]:
        """Try the repair's settings in order (pin weights or protected energies) until one brings the cross-fitted
        drop (:meth:`target_drop`) within the tolerance and raises the held-out triggered images' target confidence
        (:meth:`triggered_confidence`) by at most the tolerance and by no more than it won back (``drop``, the
        unrepaired edit's signal, computed when not given, minus its own); ``setting`` is that one, or ``None`` when
        none does (the edit is then left unrepaired: a repair that does not restore the held-out target images only
        trades the edit's strength away, and one that restores them with the trigger's effect gives the backdoor
        back). A negative tolerance forces the last setting (``forced``; ``restored`` is then ``None``: the setting is
        applied unjudged, and ``guard_passed`` says whether the guard, with the default tolerance, would have let it
        pass). Also returns the drop of each setting tried and the
        rise of each whose drop was within the tolerance (and of the forced one)."""
        settings = self.repair_weights if self.repair_method == "pin" else self.repair_energies
        tried, rises, chosen = {}, {}, None
        drop = self.target_drop(model, fit)["drop"] if drop is None else drop
        unrepaired = None  # the guard's baseline, measured once a setting restores the target images
        tolerance = self.repair_tolerance if self.repair_tolerance >= 0 else REPAIR_TOLERANCE  # the guard's
        for setting in settings if self.repair_tolerance >= 0 else settings[-1:]:
            tried[setting] = self.target_drop(model, fit, setting)
            if tried[setting]["drop"] > self.repair_tolerance and self.repair_tolerance >= 0:
                continue
            if unrepaired is None:
                unrepaired = self.triggered_confidence(model, fit)
            rises[setting] = self.triggered_confidence(model, fit, setting) - unrepaired
            passed = rises[setting] <= min(tolerance, drop - tried[setting]["drop"])
            if self.repair_tolerance < 0 or passed:
                chosen = setting
                break
        forced = self.repair_tolerance < 0
        return {"method": self.repair_method, "setting": chosen, "forced": forced,
                "restored": None if forced else chosen is not None, **({"guard_passed": passed} if forced else {}),
                "drop_with_repair": {f"{setting:g}": round(value["drop"], 4) for setting, value in tried.items()},
                "triggered_confidence_without_repair": None if unrepaired is None else round(unrepaired, 4),
                "triggered_rise_with_repair": {f"{setting:g}": round(rise, 4) for setting, rise in rises.items()},
                "validated": all(value["validated"] for value in tried.values())}

    def _repair_arguments(self, problem: EditProblem, setting: float) -> dict[str, Any]:
        """``solve``'s keyword arguments for a pin weight or a protected energy on ``problem``'s target keys."""
        if self.repair_method == "pin":
            return {"repair_weight": setting}
        if problem.target_count <= 0:
            return {}
        return {"protected": key_subspace(problem.target_moment / problem.target_count, setting)}

    def _priors(self, model: nn.Module, layers: list[str], images: Tensor,
                available: int | None) -> dict[str, tuple[Tensor, str]]:
        """The BatchNorm prior of each of ``layers`` (its key moment and the norm's name) that may get a weight: all
        of them for a weight > 0 (:meth:`candidate_layers` kept only those a BatchNorm feeds alone, and
        :meth:`_within_memory` those whose d x d moments fit in ``available`` bytes, before this), those a BatchNorm
        feeds alone when the weight is chosen on U (``None``) and whose d x d moments fit in ``available`` (else
        that layer is scored with w = 0 only, and may be solved in the span of its keys), none for 0."""
        if self.batchnorm_prior == 0:
            return {}
        priors = {}
        for name in layers:
            if self.batchnorm_prior is None and available is not None and self._moment_bytes(model, name) > available:
                continue
            try:
                priors[name] = batchnorm_key_prior(model, name, images, seed=self.seed)
            except ValueError:
                if self.batchnorm_prior is not None:
                    raise
        return priors

    @staticmethod
    def _width(model: nn.Module, name: str) -> int:
        """The key width d of layer ``name``."""
        return layer_weight_matrix(get_layer(model, name)).shape[1]

    @classmethod
    def _moment_bytes(cls, model: nn.Module, name: str) -> int:
        """Bytes of the d x d float32 matrices the moments form holds for layer ``name`` (:data:`MOMENT_COPIES`)."""
        return MOMENT_COPIES * 4 * cls._width(model, name) ** 2

    @staticmethod
    def _key_counts(model: nn.Module, layers: list[str], labels: Tensor, triggered: list[Triggered],
                    target_class: int, probe: Tensor) -> tuple[dict[str, int], dict[str, int]]:
        """The keys each of ``layers`` gets from the (augmented) unseen images with ``labels``: the triggered
        non-target keys of each of ``triggered`` (on its images), the clean keys, and the target class's again
        (for the pin); and the clean keys alone. ``probe``, one image, gives the keys per image."""
        positions = key_positions(model, layers, probe)
        non_target = labels != target_class
        attacked = sum(int(member.of(non_target).sum()) for member in triggered)
        target = len(labels) - int(non_target.sum())
        return ({name: positions[name] * (attacked + len(labels) + target) for name in layers},
                {name: positions[name] * len(labels) for name in layers})

    def _added_rows(self, labels: Tensor, target_class: int) -> Tensor | None:
        """The images (sorted indices) the triggers the edit adds itself are applied to: ``None`` (all) when the
        edit's images hold at most :data:`ADDED_TRIGGER_IMAGES` non-target images, else that many of them, drawn
        without replacement with ``seed``."""
        attacked = (labels != target_class).nonzero().flatten()
        if len(attacked) <= ADDED_TRIGGER_IMAGES:
            return None
        generator = torch.Generator().manual_seed(self.seed)
        return attacked[torch.randperm(len(attacked), generator=generator)[:ADDED_TRIGGER_IMAGES]].sort().values

    @staticmethod
    def _added_scale(labels: Tensor, target_class: int, rows: Tensor) -> float:
        """The weight of each triggered key on ``rows`` (non-target images), so that their sums stand for all the
        edit's non-target images: their number over that of ``rows``."""
        return int((labels != target_class).sum()) / len(rows)


    def _within_memory(self, model: nn.Module, layers: list[str], keys: dict[str, int], factored: dict[str, int],
                       info: dict[str, Any], available: int | None) -> list[str]:
        """``layers`` without those whose d x d moments (:data:`MOMENT_COPIES` of them each, float32, all candidates
        held at once) would not fit in ``available`` bytes (:func:`available_memory`; None: unknown, all kept),
        widest first; the skipped ones go to ``info["skipped_layers"]``. Layers solved in the span of their keys
        (``factored``) need no such matrix.

        Raises:
            ValueError: (one line) a layer named by ``layer`` (not ``auto``) does not fit, or no candidate does.
        """
        needs = {name: self._moment_bytes(model, name) for name in layers if name not in factored}
        if available is None or sum(needs.values()) <= available:
            return layers
        kept, skipped = list(layers), {}
        for name in sorted(needs, key=needs.get, reverse=True):
            if sum(needs[other] for other in kept if other in needs) <= available:
                break
            width = self._width(model, name)
            reason = (f"its {width:,} x {width:,} moments need about {needs[name] / 2**30:.1f} GiB, "
                      f"{available / 2**30:.1f} GiB is available")
            if keys[name] <= KEY_SPACE_RATIO * width and self.layer == "auto":
                reason += (f" (its {keys[name]:,} keys would be solved in their span with method=closed_form, "
                           f"repair_method=pin and no BatchNorm prior)")
            if self.layer != "auto":
                raise ValueError(f"layer {name!r}: {reason}; the edit is solved in the span of the keys instead when "
                                 f"they are at most {width:,} ({keys[name]:,} from this unseen split) with "
                                 f"method=closed_form, repair_method=pin and batchnorm_prior=0; or edit another layer")
            kept.remove(name)
            skipped[name] = reason
        if not kept:
            raise ValueError(f"no auto candidate's d x d moments fit in memory ({'; '.join(skipped.values())}); name a "
                             f"narrower layer")
        info["skipped_layers"] = skipped
        return kept

    def _layers_reached(self, model: nn.Module, layers: list[str], triggers: list[Trigger]) -> list[str]:
        """The candidate ``layers`` that feature-space triggers reach: those at or after (in definition order) the
        layer at whose input the triggers act, and for ``auto`` after it when a later one is a candidate (editing the
        stamped layer itself undoes the stamp on U but not the trigger: docs/results/cifar10.md, trigger unknown); a
        one-line error when the edit is set to a layer before it."""
        feature_layers = {member.layer for member in triggers if isinstance(member, FeatureTrigger)}
        if not feature_layers:
            return layers
        if len(feature_layers) > 1:
            raise ValueError(f"the feature-space triggers act at several layers {sorted(feature_layers)}; one edit "
                             f"needs them at one")
        (acting,) = feature_layers
        get_layer(model, acting)
        order = editable_layers(model)
        reached = [name for name in layers if order.index(name) >= order.index(acting)]
        if not reached:
            raise ValueError(f"the trigger acts at the input of {acting!r}, after the edit's layer {self.layer!r}; "
                             f"edit {acting!r} or a later layer (or layer: auto)")
        downstream = [name for name in reached if name != acting]
        return downstream if self.layer == "auto" and downstream else reached

    @staticmethod
    def _fold_sums(pieces: dict[tuple[int, int], EditProblem], axis: int) -> list[EditProblem]:
        """The two folds' problems from the (CV fold, signal fold) pieces, along ``axis`` (0: CV, 1: signal)."""
        return [functools.reduce(operator.add, [piece for key, piece in pieces.items() if key[axis] == fold])
                for fold in (0, 1)]

    @staticmethod
    def _signal_folds(labels: Tensor, folds: Tensor, views: int, target_class: int) -> Tensor:
        """The repair signal's folds: the CV folds, except that the views of a target class with a single unseen
        image alternate between the folds (each fold's edit then keeps some of its keys, and is measured on the
        others)."""
        count = len(labels) // views
        if views < 2 or int((labels[:count] == target_class).sum()) != 1:
            return folds
        view_index = torch.arange(len(labels), device=labels.device) // count
        return torch.where(labels == target_class, view_index % 2, folds)

    @staticmethod
    def _in_other_fold(labels: Tensor, folds: Tensor, held_out: int) -> Tensor:
        """For each image, whether its class has images in the fold other than ``held_out`` (the fold an edit
        scored on ``held_out`` is fitted on)."""
        return torch.isin(labels, labels[folds != held_out])

    @classmethod
    def _triggered_loss(cls, labels: Tensor, folds: Tensor, target_class: int) -> str:
        """How :meth:`_cross_validate` scores the held-out triggered images: ``cross_entropy`` when every
        non-target class is in both folds, ``attack_log_loss`` when none is (one image per class), else ``mixed``."""
        attacked = labels != target_class
        fitted = torch.cat([cls._in_other_fold(labels, folds, fold)[attacked & (folds == fold)] for fold in (0, 1)])
        return "cross_entropy" if bool(fitted.all()) else "attack_log_loss" if not fitted.any() else "mixed"

    @staticmethod
    def _folds(labels: Tensor, views: int) -> Tensor:
        """Two folds of the unseen images (all views of an image in one fold): alternate images within each
        class (whatever order the classes come in), or split by class when there is one image per class."""
        count = len(labels) // views
        originals = labels[:count]
        if int(torch.bincount(originals).max()) < 2:
            return labels % 2
        rank = torch.zeros(count, dtype=torch.long, device=labels.device)  # each image's index within its class
        for label in originals.unique():
            members = (originals == label).nonzero().flatten()
            rank[members] = torch.arange(len(members), device=labels.device)
        return (rank % 2).repeat(views)

    @staticmethod
    def _grid_weights(mask: Tensor | None, clean: LayerActivations, scale: float = 1.0) -> Tensor | None:
        """The weights (L,) of a layer's key positions from a trigger's ``mask`` (its max over each position's
        share of the image, at least 0.05), times ``scale``; ``None`` (all 1) without a mask or with one position
        and a ``scale`` of 1."""
        positions = clean.keys.shape[1]
        if mask is None or positions <= 1:
            return None if scale == 1.0 else torch.full((positions,), scale, device=clean.keys.device)
        side = int(round(positions ** 0.5))
        weights = F.adaptive_max_pool2d(mask[None].float(), (side, side)).flatten().clamp(min=0.05)
        return weights if scale == 1.0 else weights * scale

    def _cross_validate(self, model: nn.Module, layer: str, fold_problems: list[EditProblem], strength: float,
                        images: Tensor, triggered: list[Triggered], labels: Tensor, folds: Tensor,
                        target_class: int, passes: SuffixPasses | None = None
                        ) -> tuple[float, float, tuple[Tensor, Tensor]]:
        """Two-fold loss on U of editing ``layer``: fit on one fold, then the loss of the other fold's triggered
        non-target images (each image's averaged over the triggers applied to it) plus CE of its clean images; averaged
        over both directions. The triggered loss is CE to the true label, except for images of a class the fitting
        fold holds none of (all of them with one image per class): that class's clean values were not in the fit, so
        it is the attack's log-loss, −log(1 − p(target)) (:func:`attack_log_loss`). Returned with its standard
        error over the held-out images (nats both): each mean's variance over its images, the triggered and clean
        means and the two directions taken as independent; and the edits fitted on fold 0 and on fold 1."""
        total, variance, edits = 0.0, 0.0, [None, None]
        for held_out in (0, 1):
            delta = edits[1 - held_out] = fold_problems[1 - held_out].solve(self.method, strength, self.rank)
            check = folds == held_out
            attacked = check & (labels != target_class)
            fitted = self._in_other_fold(labels, folds, held_out)  # the image's class is in the fit
            with trial_edit(model, layer, delta):
                triggered_losses = []
                for index, member in enumerate(triggered):
                    rows = member.of(attacked)
                    with member.trigger.attached(model):
                        logits = self._held_out(model, passes, layer, f"trigger {index}", member.images, rows)
                    triggered_losses.append(torch.where(
                        member.of(fitted)[rows], F.cross_entropy(logits, member.of(labels)[rows], reduction="none"),
                        attack_log_loss(logits, target_class)))
                clean = F.cross_entropy(self._held_out(model, passes, layer, "clean", images, check), labels[check],
                                        reduction="none")
            for losses in (self._per_image_mean(triggered, triggered_losses, attacked), clean):
                total += losses.mean().item()
                variance += losses.var().item() / len(losses) if len(losses) > 1 else 0.0
        return total / 2, variance ** 0.5 / 2, (edits[0], edits[1])

    def _suffix_passes(self, model: nn.Module, layers: list[str], available: int | None) -> SuffixPasses:
        """The held-out passes' shortcut for ``layers``, its records within a share of the ``available`` memory."""
        return SuffixPasses(model, layers, self.bf16, memory=None if available is None
                            else int(available * SUFFIX_MEMORY_FRACTION))

    def _held_out(self, model: nn.Module, passes: SuffixPasses | None, layer: str, name: str, images: Tensor,
                  rows: Tensor) -> Tensor:
        """Logits of ``images[rows]`` through ``model`` as it is now, ``layer`` edited: by ``passes`` when given
        (only the graph after ``layer``, where it recorded ``name``), else a whole pass."""
        if passes is not None:
            return passes.logits(layer, name, images, rows)
        return predict_logits(model, images[rows], bf16=self.bf16)
