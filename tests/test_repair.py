"""The repair step: its cross-fitted signal sees an edit that hurts the target class, the repair restores the
target class on images the defense never saw, and where the edit does no harm nothing changes (bit-identical)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import Tensor, nn

from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.activation_editing import predict_logits
from lightning_backdoor.defenses.editing import key_subspace, protected_edit
from lightning_backdoor.defenses.report import repair_warning
from lightning_backdoor.triggers import Trigger

SIDE, CLASSES, TARGET = 4, 3, 0


class Additive(Trigger):
    """Adds a fixed pattern (the test's backdoor)."""

    def __init__(self, pattern: Tensor) -> None:
        super().__init__()
        self.pattern = pattern

    def apply(self, images: Tensor) -> Tensor:
        return images + self.pattern


def world(shared: float, seed: int = 0) -> tuple[nn.Module, Trigger, callable]:
    """A linear classifier on 1×4×4 "images" whose class c reads direction c, plus a backdoor direction that sends to
    the target: ``shared`` of the target class's images' signal lies along the backdoor direction too. With
    ``shared`` > 0 an edit that cancels the backdoor direction removes part of the target class's evidence."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(SIDE * SIDE, SIDE * SIDE, generator=generator))[0].T[:CLASSES + 1]
    head = nn.Linear(SIDE * SIDE, CLASSES, bias=False)
    with torch.no_grad():
        head.weight.copy_(4 * basis[:CLASSES])
        head.weight[TARGET] += 4 * basis[CLASSES]  # the backdoor direction counts for the target
    model = nn.Sequential(nn.Flatten(), head).eval()
    pattern = basis[CLASSES].view(1, SIDE, SIDE)

    def draw(count: int, label: int, seed: int) -> Tensor:
        noise = torch.Generator().manual_seed(seed)
        strength = 1 + 0.2 * torch.randn(count, 1, generator=noise)
        direction = basis[label] if label != TARGET else (1 - shared) * basis[label] + shared * basis[CLASSES]
        images = strength * direction + 0.05 * torch.randn(count, SIDE * SIDE, generator=noise)
        return images.view(count, 1, SIDE, SIDE)

    return model, Additive(pattern), draw


def unseen_set(draw, per_class: int, seed: int) -> UnseenData:
    images = torch.cat([draw(per_class, label, seed + label) for label in range(CLASSES)])
    return UnseenData(images, torch.arange(CLASSES).repeat_interleave(per_class))


def target_confidence(model: nn.Module, images: Tensor) -> float:
    return predict_logits(model, images).softmax(-1)[:, TARGET].mean().item()


def defend(model: nn.Module, trigger: Trigger, unseen: UnseenData, **settings) -> tuple[nn.Module, object]:
    edited = copy.deepcopy(model)
    defense = ActivationEditing(layer="1", strength=0.3, min_images=1, **settings)
    return edited, defense.defend(edited, unseen, BackdoorKnowledge.of(trigger, TARGET))


@pytest.mark.parametrize("method", ["pin", "protect"])
def test_the_signal_sees_a_hurt_target_class_and_the_repair_restores_it(method: str) -> None:
    model, trigger, draw = world(shared=0.9)
    unseen = unseen_set(draw, 4, seed=0)
    fresh = draw(200, TARGET, seed=99)  # target-class images the defense never saw
    unrepaired, plain = defend(model, trigger, unseen, repair=False)
    repaired, result = defend(model, trigger, unseen, repair_method=method)
    before = target_confidence(model, fresh)
    # the edit alone costs the target class on images it never saw ...
    assert target_confidence(unrepaired, fresh) < before - 0.1
    # ... the cross-fitted signal on U sees it, the repair fires and wins most of it back
    signal = result.details["repair_signal"]
    assert signal["drop"] > 0.02 and result.repaired and result.details["repair"]["method"] == method
    views = result.details["views"]  # every view of the 4 unseen target images is held out by one fold
    assert signal["held_out_target_images"] == 4 and signal["held_out_target_views"] == 4 * views, (signal, views)
    assert target_confidence(repaired, fresh) > target_confidence(unrepaired, fresh) + 0.05
    assert repair_warning(result.details) is None  # repaired: no warning
    # the backdoor stays removed: triggered non-target images are not sent to the target
    attacked = trigger(torch.cat([draw(100, label, 50 + label) for label in range(1, CLASSES)]))
    assert (predict_logits(repaired, attacked).argmax(-1) == TARGET).float().mean() < 0.2
    # the report keeps the edit before the repair
    assert set(result.stages["after_edit"]) == {"1.weight"}
    assert not torch.equal(result.stages["after_edit"]["1.weight"], repaired[1].weight)


def test_where_the_edit_does_no_harm_the_repair_changes_nothing() -> None:
    model, trigger, draw = world(shared=0.0)
    unseen = unseen_set(draw, 4, seed=0)
    without, _ = defend(model, trigger, unseen, repair=False)
    with_repair, result = defend(model, trigger, unseen)
    assert result.details["repair_signal"]["drop"] <= 0.02 and not result.repaired and not result.stages
    assert torch.equal(with_repair[1].weight, without[1].weight)  # bit-identical
    assert "repair" not in result.details and repair_warning(result.details) is None  # not tried: no warning


def test_a_negative_tolerance_repairs_even_where_the_signal_saw_the_target_gain(monkeypatch) -> None:
    model, trigger, draw = world(shared=0.0)
    unseen = unseen_set(draw, 4, seed=0)
    defense = ActivationEditing(layer="1", strength=0.3, min_images=1, repair_tolerance=-0.01)
    monkeypatch.setattr(ActivationEditing, "target_drop", lambda self, model, fit, setting=None: {
        "drop": -0.05, "validated": True})  # the edit raised the held-out target confidence: more than |τ|
    result = defense.defend(copy.deepcopy(model), unseen, BackdoorKnowledge.of(trigger, TARGET))
    assert result.details["repair"]["forced"] and result.repaired, result.details.get("repair")


def test_a_single_target_image_splits_its_views_between_the_signal_folds() -> None:
    labels = torch.arange(CLASSES).repeat(4)  # 1 image per class, 4 views
    folds = ActivationEditing._folds(labels, 4)
    signal = ActivationEditing._signal_folds(labels, folds, 4, TARGET)
    target = labels == TARGET
    assert folds[target].unique().numel() == 1  # the CV keeps all views of an image in one fold
    assert signal[target].tolist() == [0, 1, 0, 1] and torch.equal(signal[~target], folds[~target])


def test_a_single_target_image_gets_two_views_so_that_a_repair_can_be_validated() -> None:
    # one image per class and min_images=1: the edit alone keeps one view of each image, but the repair's signal
    # needs the target image's views in both folds, or the fold it fits on holds no target key to pin
    model, trigger, draw = world(shared=0.9)
    unseen = unseen_set(draw, 1, seed=0)
    _, plain = defend(model, trigger, unseen, repair=False)
    _, result = defend(model, trigger, unseen)
    assert plain.details["views"] == 1 and result.details["views"] == 2
    signal = result.details["repair_signal"]
    assert signal["held_out_target_views"] == 2 and signal["drop"] > 0.02, signal  # each fold: the other's view
    assert signal["held_out_target_images"] == 1, signal  # of the one unseen target image
    repair = result.details["repair"]
    assert repair["validated"], repair
    assert len(set(repair["drop_with_repair"].values())) > 1, repair  # the pins act (with one view they could not)


def test_the_protected_edit_leaves_protected_directions_alone_and_is_optimal_otherwise() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 8, generator=generator, dtype=torch.float64)
    moment = keys.T @ keys / 200
    residual = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    preserve = torch.eye(8, dtype=torch.float64)
    protected = torch.linalg.qr(torch.randn(8, 2, generator=generator, dtype=torch.float64))[0]
    delta = protected_edit(moment, residual, preserve, 1.0, protected)
    assert torch.allclose(delta @ protected, torch.zeros(3, 2, dtype=torch.float64), atol=1e-10)
    # no feasible step improves the objective tr(Δ S Δᵀ) − 2 tr(Δ Rᵀ): its gradient lies in the protected span
    system = moment + (preserve + 1e-4 * preserve.trace() / 8 * torch.eye(8, dtype=torch.float64))
    gradient = 2 * (delta @ system - residual)
    free = torch.eye(8, dtype=torch.float64) - protected @ protected.T
    assert torch.allclose(gradient @ free, torch.zeros(3, 8, dtype=torch.float64), atol=1e-8)
    # key_subspace takes the fewest top directions holding the asked energy
    spectrum = torch.diag(torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    assert key_subspace(spectrum, 0.5).shape == (4, 1) and key_subspace(spectrum, 0.8).shape == (4, 2)


def test_folds_alternate_within_each_class_whatever_the_order_of_the_images() -> None:
    labels = torch.arange(10).repeat(3)  # the unseen split's order: the i-th image of every class, then the next
    folds = ActivationEditing._folds(labels, 1)
    assert all(folds[labels == label].tolist() == [0, 1, 0] for label in range(10))  # not fold = label parity
    with_views = ActivationEditing._folds(labels.repeat(2), 2)
    assert torch.equal(with_views, folds.repeat(2))  # the views of an image stay in its fold


def test_a_repair_that_does_not_restore_the_target_class_is_not_applied() -> None:
    model, trigger, draw = world(shared=0.9)
    unseen = unseen_set(draw, 4, seed=0)
    without, _ = defend(model, trigger, unseen, repair=False)
    useless, result = defend(model, trigger, unseen, repair_weights=(0.0,))  # pins nothing: the drop stays
    repair = result.details["repair"]
    assert result.details["repair_signal"]["drop"] > 0.02 and repair["setting"] is None and not repair["restored"]
    assert repair["drop_with_repair"]["0"] > 0.02 and not result.repaired
    assert torch.equal(useless[1].weight, without[1].weight)
    warning = repair_warning(result.details)  # the user is told, with the signal's drop
    assert "no repair setting restored them" in warning and f"{result.details['repair_signal']['drop']:.3f}" in warning
    images = result.details["repair_signal"]["held_out_target_images"]
    assert f"(measured on {images} image" in warning and ("so few make this check noisy" in warning) == (images < 10)


class BlendTarget(Trigger):
    """Blends a fixed target-class image into every image: triggered keys lean towards the target class's own."""

    def __init__(self, image: Tensor, alpha: float) -> None:
        super().__init__()
        self.image, self.alpha = image, alpha

    def apply(self, images: Tensor) -> Tensor:
        return (1 - self.alpha) * images + self.alpha * self.image


def test_a_repair_that_gives_the_trigger_back_is_refused() -> None:
    # the trigger blends a target-class image: removing it hurts the target class (the signal fires), and the pins
    # that restore the held-out target images also raise the held-out triggered images' target confidence by more
    # than the tolerance; the guard leaves the edit unrepaired
    model, _, draw = world(shared=0.0)
    trigger = BlendTarget(draw(1, TARGET, seed=7)[0], alpha=0.5)
    unseen = unseen_set(draw, 4, seed=0)
    unrepaired, _ = defend(model, trigger, unseen, repair=False)
    guarded, result = defend(model, trigger, unseen)
    repair = result.details["repair"]
    assert result.details["repair_signal"]["drop"] > 0.1, result.details["repair_signal"]
    restoring = [weight for weight, drop in repair["drop_with_repair"].items() if drop <= 0.02]
    assert restoring, repair  # some pin does restore the held-out target images ...
    assert all(repair["triggered_rise_with_repair"][weight] > 0.02 for weight in restoring), repair  # ... not alone
    assert repair["setting"] is None and not result.repaired
    assert torch.equal(guarded[1].weight, unrepaired[1].weight)
    assert "would give the backdoor back" in repair_warning(result.details)
    # the rise the guard measured on U's held-out folds is real: applied anyway, that pin raises the target
    # confidence of triggered images the defense never saw
    attacked = trigger(torch.cat([draw(100, label, 50 + label) for label in range(1, CLASSES)]))
    given_back, forced = defend(model, trigger, unseen, repair_weights=(float(restoring[0]),), repair_tolerance=-1)
    assert target_confidence(given_back, attacked) > target_confidence(unrepaired, attacked) + 0.02
    assert forced.repaired and forced.details["repair"]["forced"] and forced.details["repair"]["restored"] is None
    warning = repair_warning(forced.details)  # the user is told what the guard would have done
    assert "the forced repair (pin" in warning and "the guard refuses it" in warning


@pytest.mark.parametrize(("signal", "drops", "rises", "chosen"), [
    (0.025, {1.0: 0.015}, {1.0: 0.012}, None),  # rise within τ but above what it won back (0.010): refused
    (0.025, {1.0: 0.015, 4.0: 0.001}, {1.0: 0.012, 4.0: 0.015}, 4.0),  # pin 4 wins back 0.024 > its rise
    (0.1, {1.0: 0.001}, {1.0: 0.030}, None),  # won back 0.099, but the rise is above τ: refused
    (0.1, {1.0: 0.030, 4.0: 0.010}, {4.0: 0.0}, 4.0),  # pin 1 does not restore (no rise measured), pin 4 passes
])
def test_the_guard_accepts_a_rise_up_to_the_tolerance_and_to_what_the_repair_won_back(
        signal: float, drops: dict[float, float], rises: dict[float, float], chosen: float | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the rule alone, with the two cross-fitted measurements stubbed (τ = 0.02)
    defense = ActivationEditing(repair_weights=tuple(drops), repair_tolerance=0.02)
    monkeypatch.setattr(defense, "target_drop", lambda model, fit, setting=None: {
        "drop": signal if setting is None else drops[setting], "validated": True})
    monkeypatch.setattr(defense, "triggered_confidence", lambda model, fit, setting=None: (
        0.1 if setting is None else 0.1 + rises[setting]))
    repair = defense.choose_repair(nn.Identity(), None)
    assert repair["setting"] == chosen and repair["restored"] == (chosen is not None), repair
    assert set(repair["triggered_rise_with_repair"]) == {f"{setting:g}" for setting in rises}, repair
    warning = repair_warning({"repair": repair, "repair_signal": {"drop": signal}})
    assert (warning is None) == (chosen is not None)
    assert warning is None or "would give the backdoor back" in warning


@pytest.mark.parametrize(("arguments", "message"), [
    ({"repair_weights": ()}, "repair_weights=\\(\\) must be one or more numbers >= 0"),
    ({"repair_weights": (1.0, float("inf"))}, "repair_weights=.* must be one or more numbers >= 0"),
    ({"repair_energies": (0.5, 1.5)}, "repair_energies=.* must be one or more fractions in \\(0, 1\\]"),
    ({"repair_tolerance": float("nan")}, "repair_tolerance=nan must be a finite number"),
    ({"candidates": 0}, "candidates=0 must be an integer >= 1"),  # [-0:] would silently try every layer
    ({"rank": 0}, "rank=0 must be an integer >= 1"),
    ({"min_images": -1}, "min_images=-1 must be an integer >= 0"),
    ({"strength": float("nan")}, "strength=nan must be a positive number"),
    ({"repair": False, "repair_tolerance": -1.0}, "repair=false, but repair_tolerance=-1.0 is set: repair settings do "
                                                  "nothing without the repair"),
])
def test_settings_the_edit_cannot_use_are_refused_when_it_is_built(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ActivationEditing(**arguments)


@pytest.mark.parametrize(("rise", "warned"), [(0.004, False), (0.006, True)])
def test_a_forced_repair_is_reported_unjudged_and_warned_about_when_it_gives_more_than_it_won_back(
        rise: float, warned: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # τ < 0 applies the last setting whatever it measures (stubbed: signal 0.010, drop with the pin 0.005)
    defense = ActivationEditing(repair_weights=(1.0, 4.0), repair_tolerance=-1.0)
    monkeypatch.setattr(defense, "target_drop", lambda model, fit, setting=None: {
        "drop": 0.010 if setting is None else 0.005, "validated": True})
    monkeypatch.setattr(defense, "triggered_confidence", lambda model, fit, setting=None: (
        0.1 if setting is None else 0.1 + rise))
    repair = defense.choose_repair(nn.Identity(), None, 0.010)
    assert repair["setting"] == 4.0 and repair["forced"] and repair["restored"] is None, repair
    warning = repair_warning({"repair": repair, "repair_signal": {"drop": 0.010}})
    assert (warning is not None) == warned, warning
    assert warning is None or ("while winning back 0.005 for the held-out target images" in warning
                               and "the signal's drop is within the default repair_tolerance (0.02)" in warning)


def test_the_signal_reuses_the_cross_validations_fold_edits_and_measures_the_same() -> None:
    """With λ chosen on U (several options cross-validated), the signal's unrepaired fold edits are the CV's at the
    chosen option, bit for bit, so they are not solved twice; with a single target image the signal's folds differ
    from the CV's and its edits are solved afresh."""
    model, trigger, draw = world(shared=0.9)
    knowledge = BackdoorKnowledge.of(trigger, TARGET)
    defense = ActivationEditing(layer="1", strength=None, min_images=1)
    fit = defense.fit(model, unseen_set(draw, 4, seed=0), knowledge)
    assert fit.fold_edits is not None and len(fit.info["selection"]["cross_validated_loss_on_unseen"]) > 1
    for fold in (0, 1):
        assert torch.equal(fit.fold_edits[fold],
                           fit.signal_problems[fold].solve(defense.method, fit.strength, defense.rank))
    assert defense.target_drop(model, fit) == defense.target_drop(model, dataclasses.replace(fit, fold_edits=None))
    single = defense.fit(model, unseen_set(draw, 1, seed=0), knowledge)
    assert single.fold_edits is None  # the target image's views alternate between the signal's folds
