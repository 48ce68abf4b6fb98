"""The trigger as a training augmentation shows it. A model trained with random horizontal flips learns the trigger's
mirror image (measured on the CIFAR-10 BadNets model: 95 % ASR, 94 % left after an edit with the given trigger
alone); the edit adds it when it works on the unseen images, and every report measures it on the test split. Random
crops move a local trigger, and the edit adds the moves that work on the unseen images."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from callback_models import digits, trained
from torch import nn

from lightning_backdoor import DefenseCallback
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.report import (TestData, augmented_asr, mirror_left, moved_left, run_defense,
                                                trigger_success_rate)
from lightning_backdoor.evaluation import in_batches
from lightning_backdoor.defenses.inversion import FeatureTrigger
from lightning_backdoor.triggers import (SIG, BadNets, Blended, Mirrored, Shifted, Trigger, augmentation_images,
                                        crop_distance, distinct_mirror, distinct_shifts)


@pytest.mark.parametrize("trigger", [BadNets(size=3), Blended(alpha=0.2), SIG()], ids=["badnets", "blended", "sig"])
def test_a_mirrored_trigger_is_the_trigger_on_the_flipped_image_flipped_back(trigger) -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mirrored = Mirrored(trigger)
    torch.testing.assert_close(mirrored(images), trigger(images.flip(-1)).flip(-1))
    torch.testing.assert_close(Mirrored(mirrored)(images), trigger(images))  # twice: the trigger again
    assert not torch.equal(mirrored(images), trigger(images))
    mask = trigger.mask((3, 16, 16))
    if mask is not None:  # a local trigger's mask moves with it: the bottom-left corner for the bottom-right one
        assert torch.equal(mirrored.mask((3, 16, 16)), mask.flip(-1))
        assert mirrored.mask((3, 16, 16))[0, -1, 0] == 1 and mirrored.mask((3, 16, 16))[0, -1, -1] == 0


def test_only_a_pixel_trigger_with_a_distinct_mirror_image_has_one_to_measure() -> None:
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert isinstance(distinct_mirror(BadNets(size=3), images), Mirrored)  # bottom-right: the mirror is bottom-left
    assert distinct_mirror(BadNets(size=4, position=(6, 6)), images) is None  # centred columns 6-9 of 16: symmetric
    assert distinct_mirror(FeatureTrigger("fc", torch.ones(4), torch.ones(4)), images) is None  # not on pixels
    assert distinct_mirror(BadNets(size=3), images[:0]) is None  # nothing to compare on


def defended(tmp_path: Path, flips: bool, mirror: bool | None) -> dict:
    """The mirror image alone: no moves (this max-pooled model takes the patch moved by 1 px as the patch, and the
    moves, 7 triggers more, would share the edit's triggered term with it)."""
    callback = DefenseCallback(defense=ActivationEditing(layer="fc", mirror=mirror, shift=0))
    callback.defend(trained(flips=flips), digits(), [], tmp_path / f"{flips}-{mirror}")
    return json.loads(callback.report_path.read_text())


def test_the_edit_removes_the_mirror_image_a_model_trained_with_flips_learnt(tmp_path: Path) -> None:
    """Trained with flips, the mirrored patch works as the patch does; the default edit measures so on the unseen
    images, adds it, and removes both; told not to, it leaves more of the mirror image working (on this small head
    an edit for the patch alone removes part of its mirror image too: 97 % -> 21 %, against 7 % with it; on the
    CIFAR-10 model 94 %, against 2 %), and the report says so."""
    report = defended(tmp_path, flips=True, mirror=None)
    before, after = report["before"], report["after"]
    assert before["asr"] >= 0.8 and before["mirrored_asr"] >= 0.8, before  # both learnt
    facts = report["defense"]["mirrored_triggers"]
    assert len(facts) == 1 and facts[0]["included"] and facts[0]["success_on_unseen"] >= 0.5, facts
    assert facts[0]["trigger"] == 0  # the index of the trigger it mirrors
    assert 0 < report["defense"]["success_checked_images"] <= 256  # how many non-target unseen images it measured
    for name in ("asr", "mirrored_asr"):
        assert after[name] <= after["asr_floor"] + 0.1, after
    alone = defended(tmp_path, flips=True, mirror=False)
    assert alone["after"]["asr"] <= alone["after"]["asr_floor"] + 0.1
    assert alone["after"]["mirrored_asr"] >= max(after["mirrored_asr"] + 0.05, alone["after"]["asr_floor"] + 0.1), (
        alone["after"], after)
    assert "mirrored_triggers" not in alone["defense"]
    warning = next(line for line in alone["warnings"] if "mirror image" in line)
    assert warning.startswith(f"the test trigger's mirror image (flipped left-right) still succeeds on "
                              f"{100 * alone['after']['mirrored_asr']:.1f} % of the test images not of the target class "
                              f"after the defense")
    assert warning.endswith("edit with mirror: true (ActivationEditing; defend: --defense.mirror true; its default, "
                            "null, adds it when it works on the unseen images)")


def test_a_mirror_image_the_model_did_not_learn_is_measured_and_left_out(tmp_path: Path) -> None:
    """Trained without flips, the mirrored patch does not work; the default edit measures that on the unseen
    images and edits with the given trigger alone, as ``mirror: false`` does, to the same weights."""
    report = defended(tmp_path, flips=False, mirror=None)
    assert report["before"]["mirrored_asr"] < 0.5 <= report["before"]["asr"], report["before"]
    facts = report["defense"]["mirrored_triggers"]
    assert len(facts) == 1 and not facts[0]["included"] and facts[0]["success_on_unseen"] < 0.5, facts
    alone = defended(tmp_path, flips=False, mirror=False)
    assert alone["weights"]["sha256_after"] == report["weights"]["sha256_after"]


def test_the_warning_says_whether_the_edit_included_the_mirror_image() -> None:
    after = {"mirrored_asr": 0.30, "asr_floor": 0.02}
    included = {"mirrored_triggers": [{"success_on_unseen": 0.9, "included": True}]}
    assert mirror_left(after, included).endswith("the edit mapped it to clean values too, and reduced it only: more "
                                                 "unseen images may remove more")
    left_out = {"mirrored_triggers": [{"success_on_unseen": 0.3, "included": False}]}
    assert mirror_left(after, left_out).endswith("it was left out of the edit, as it worked on 30 % of the unseen "
                                                 "images only (below 50 %): edit with mirror: true (defend: --defense.mirror true)")
    assert mirror_left({"mirrored_asr": 0.06, "asr_floor": 0.02}, included) is None  # within 5 pt of the floor
    assert mirror_left({"asr_floor": 0.02}) is None  # not measured


def test_a_moved_trigger_is_the_trigger_elsewhere_with_nothing_wrapped_across_the_border() -> None:
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    corner = BadNets(size=3)  # rows and columns 9-11
    torch.testing.assert_close(Shifted(corner, (-4, -2))(images), BadNets(size=3, position=(5, 7))(images))
    assert torch.equal(Shifted(corner, (-4, -2)).mask((3, 12, 12)), BadNets(size=3, position=(5, 7)).mask((3, 12, 12)))
    partly_out = Shifted(corner, (2, 0))  # rows 11-13: one row left in the image, none wrapped to the top
    changed = (partly_out(images) != images).any(1)
    assert changed[:, 11, 9:].all() and changed.sum() == 2 * 3, changed
    assert torch.equal(partly_out.mask((3, 12, 12))[0].nonzero()[:, 0].unique(), torch.tensor([11]))
    blended = Blended(alpha=0.2)
    moved = Shifted(blended, (0, 3))(images)
    assert moved.min() >= 0 and moved.max() <= 1 and torch.equal(moved[..., :3], images[..., :3])
    with pytest.raises(ValueError, match="smaller than the image"):
        Shifted(corner, (0, 12)).check((3, 12, 12))
    with pytest.raises(ValueError, match="smaller than the image"):
        Shifted(corner, (0, 12))(images)  # nothing would be left of it
    for shift in ((1.5, 0), (1, 2, 3), 4, (True, 0)):
        with pytest.raises(ValueError, match="must be two integers"):
            Shifted(corner, shift)
    torch.testing.assert_close(Shifted(corner, (-1, -1))(images[0]), Shifted(corner, (-1, -1))(images)[0])  # (C, H, W)


def test_the_moves_kept_are_those_that_change_the_image_and_the_trigger() -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert {tuple(move.shift) for move in distinct_shifts(BadNets(size=3), 4, images)} == {(-4, -4), (-4, 0), (0, -4)}
    assert distinct_shifts(BadNets(size=3), 0, images) == []
    for distance, message in ((-4, "integer number of pixels"), (2.5, "integer number of pixels"),
                              (32, "smaller than the images")):
        with pytest.raises(ValueError, match=message):
            distinct_shifts(BadNets(size=3), distance, images)
    with pytest.raises(ValueError, match="a batch"):
        distinct_shifts(BadNets(size=3), 4, images[0])
    assert distinct_shifts(Blended(alpha=0.2), 4, images) == []  # global: moved by 4 px, nearly itself
    # the crop's distance: 1/8 of the width, at least 1, 0 without room or for inputs that are no image batch
    assert [crop_distance(torch.zeros(1, 3, side, side)) for side in (32, 28, 8, 2, 1)] == [4, 3, 1, 1, 0]
    assert crop_distance(torch.zeros(1, 3, 4, 64)) == 0 and crop_distance(torch.zeros(3, 32, 32)) == 0


def moved_edit(shift: int, trigger: Trigger | list[Trigger] | None = None) -> tuple[dict, nn.Module, nn.Module]:
    """The digits model edited at its second conv (keys per position, so a moved patch has keys of its own) with
    ``shift`` and ``trigger`` (the 3x3 patch it was trained with); the details, the model before and after."""
    data = digits()
    data.setup("fit")
    unseen = data.unseen_set(10, 0)
    model = trained().eval()
    edited = copy.deepcopy(model)
    knowledge = BackdoorKnowledge.of(trigger or BadNets(size=3), 0)
    result = ActivationEditing(layer="features.2", shift=shift).defend(
        edited, UnseenData(unseen.images.float() / 255, unseen.labels), knowledge)
    return result.details, model, edited


def test_the_edit_adds_the_moves_that_work_on_the_unseen_images() -> None:
    """Each local move is measured on U; those sending at least half of its non-target images to the target join
    the edit and end at the floor on the test images; a global trigger is not moved, and of several candidates (an
    estimate's) only the first; shift 0 measures nothing."""
    details, model, edited = moved_edit(shift=2)
    facts = details["shifted_triggers"]
    assert {tuple(fact["shift"]) for fact in facts} <= {(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2)}
    assert all(fact["included"] == (fact["success_on_unseen"] >= 0.5) for fact in facts), facts
    included = [tuple(fact["shift"]) for fact in facts if fact["included"]]
    assert included, facts  # on this model the patch moved up two rows works as the patch does
    data = digits()
    data.setup("test")
    images, labels = data.test_dataset().tensors[:2]
    with torch.no_grad():
        floor = (edited(images[labels != 0].float() / 255).argmax(-1) == 0).float().mean().item()
    for move in included:
        trigger = Shifted(BadNets(size=3), move)
        assert trigger_success_rate(model, trigger, 0, in_batches(images, labels)) >= 0.5
        assert trigger_success_rate(edited, trigger, 0, in_batches(images, labels)) <= floor + 0.05
    assert "shifted_triggers" not in moved_edit(shift=0)[0]
    with pytest.raises(ValueError, match="shift=8 must be smaller than the unseen images' 8x8 pixels"):
        moved_edit(shift=8)
    with pytest.raises(ValueError, match="shift=8 must be smaller"):  # refused at setup, before any work
        ActivationEditing(shift=8).check_model(model, torch.rand(2, 1, 8, 8))
    for shift in (-1, 2.5, True):
        with pytest.raises(ValueError, match="must be an integer number of pixels"):
            ActivationEditing(shift=shift)
    assert "shifted_triggers" not in moved_edit(shift=2, trigger=Blended(alpha=0.2))[0]  # global: not moved
    candidates = [BadNets(size=3), BadNets(size=2)]  # several (an estimate's): the first one alone is moved
    moved = moved_edit(shift=2, trigger=candidates)[0]["shifted_triggers"]
    assert {fact["trigger"] for fact in moved} == {0}
    assert [fact["shift"] for fact in moved] == [fact["shift"] for fact in facts]  # as when it is given alone


def test_the_benchmarks_measure_the_mirror_image_and_the_worst_move() -> None:
    """A corner patch's mirror image and the 3 inward moves of each; the measured ASR of the worst move."""
    mirrored, moves = augmentation_images(BadNets(size=3), torch.rand(2, 3, 32, 32))
    assert isinstance(mirrored, Mirrored) and len(moves) == 6
    assert {tuple(move.shift) for move in moves[3:]} == {(-4, 0), (-4, 4), (0, 4)}  # the mirror image's inward moves
    assert augmentation_images(Blended(alpha=0.2), torch.rand(2, 3, 32, 32))[1] == []
    data = digits()
    data.setup("test")
    images, labels = data.test_dataset().tensors[:2]
    model = trained(flips=True).eval()
    mirrored, moves = augmentation_images(BadNets(size=3), images[:2].float() / 255, distance=1)
    values = augmented_asr(model, mirrored, moves, 0, in_batches(images, labels))
    each = [trigger_success_rate(model, move, 0, in_batches(images, labels)) for move in moves]
    assert values == {"mirrored_asr": trigger_success_rate(model, mirrored, 0, in_batches(images, labels)),
                      "moved_asr": max(each)}
    assert augmented_asr(model, None, [], 0, in_batches(images, labels)) == {}

    class Counted:  # a test split that counts its reads (a streaming one decodes its images at each)
        reads = 0

        def __iter__(self):
            Counted.reads += 1
            return iter(in_batches(images, labels))

    assert augmented_asr(model, mirrored, moves, 0, Counted()) == values and Counted.reads == 1


def reported(defense: ActivationEditing, trigger: Trigger) -> tuple[dict, dict, nn.Module, Trigger | None, list]:
    """``run_defense`` of the digits model with ``defense``, the test split triggered with ``trigger``: the report's
    stages and details, the defended model, and the mirror image and moves the report measures (1 px on 8x8)."""
    data = digits()
    data.setup("fit")
    data.setup("test")
    unseen = data.unseen_set(10, 0)
    images, labels = data.test_dataset().tensors[:2]
    model = trained().eval()
    test = TestData.from_clean(images, labels, trigger, 0, 10)
    pixels = unseen.images.float() / 255
    report = run_defense(model, defense, UnseenData(pixels, unseen.labels), BackdoorKnowledge.of(trigger, 0), test)
    return report.stages, report.to_json(), model, *augmentation_images(trigger, pixels)


def test_the_report_measures_the_worst_move_of_a_local_trigger_on_the_test_split() -> None:
    """``moved_asr`` at each stage is the largest test ASR over the moves of the trigger and of its mirror image by
    a crop's 1/8 of the width, as ``augmented_asr`` measures them on the defended model; the summary line shows it,
    and the warning appears exactly when it stays 5 pt above the floor; a global trigger has no moves."""
    stages, report, model, mirrored, moves = reported(ActivationEditing(layer="fc", shift=0), BadNets(size=3))
    assert isinstance(mirrored, Mirrored) and {tuple(move.shift) for move in moves} >= {(-1, 0), (0, -1), (-1, -1)}
    data = digits()
    data.setup("test")
    images, labels = data.test_dataset().tensors[:2]
    measured = augmented_asr(model, mirrored, moves, 0, in_batches(images, labels))
    assert stages["after"]["moved_asr"] == pytest.approx(measured["moved_asr"], abs=1e-6)
    assert stages["after"]["mirrored_asr"] == pytest.approx(measured["mirrored_asr"], abs=1e-6)
    assert stages["before"]["moved_asr"] >= 0.5, stages["before"]  # the patch moved by 1 px works on this model
    warned = [line for line in report["warnings"] if line.startswith("the test trigger moved by 1 px")]
    assert bool(warned) == (stages["after"]["moved_asr"] > stages["after"]["asr_floor"] + 0.05), (warned, stages)
    assert not any("moved" in line for line in report["warnings"] if line not in warned)
    stages, report, *_ = reported(ActivationEditing(layer="fc", shift=0), Blended(alpha=0.2))
    assert "moved_asr" not in stages["before"] and "moved_asr" not in stages["after"]


def test_the_warning_about_moves_says_what_the_edit_did_with_them() -> None:
    after = {"moved_asr": 0.12, "asr_floor": 0.01}
    start = ("the test trigger moved by 4 px (as a random crop of the training images moves it) still succeeds on "
             "12.0 % of the test images not of the target class after the defense (floor 1.0 %)")
    assert moved_left(after, 4).startswith(start)
    assert moved_left(after, 4).endswith("edit with the moves: ActivationEditing's shift (defend: --defense.shift N; "
                                         "its default, null, moves a local trigger by 1/8 of the image width; 0 turns "
                                         "the moves off)")
    included = {"shifted_triggers": [{"success_on_unseen": 0.9, "included": True},
                                     {"success_on_unseen": 0.2, "included": False}]}
    assert moved_left(after, 4, included).endswith("reduced it only: more unseen images may remove more")
    left_out = {"shifted_triggers": [{"success_on_unseen": 0.3, "included": False},
                                     {"success_on_unseen": 0.42, "included": False}]}
    assert moved_left(after, 4, left_out).endswith("none worked on 50 % of the unseen images (largest 42 %)")
    assert moved_left(after, 4, {"trigger_known": False}).endswith(
        "its main candidate is no local patch the edit could move: defend with the trigger known if you have it")
    assert moved_left(after, 4, {}, "FineTuning").endswith("this defense did not remove it")
    assert mirror_left({"mirrored_asr": 0.3, "asr_floor": 0.0}, {}, "FinePruning").endswith(
        "this defense did not remove it")
    assert moved_left({"moved_asr": 0.06, "asr_floor": 0.01}, 4) is None  # within 5 pt of the floor
    assert moved_left({"asr_floor": 0.01}, 4) is None  # not measured


def test_the_success_checks_run_on_a_seeded_subset_of_a_large_unseen_split() -> None:
    """However large U is, a mirror image's or a move's success is measured on at most ``SUCCESS_IMAGES`` of its
    non-target images, drawn with the defense's seed (all of them when fewer), so each check costs one small pass."""
    from lightning_backdoor.defenses.activation_editing import SUCCESS_IMAGES
    labels = torch.arange(10).repeat(60)  # 600 images, 540 not of target class 0
    images = torch.arange(len(labels), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 2, 2).clone()
    unseen = UnseenData(images, labels)
    checked = ActivationEditing(seed=3)._checked_images(unseen, 0)
    indices = checked[:, 0, 0, 0].long()
    assert len(indices) == SUCCESS_IMAGES == len(indices.unique())
    assert bool((labels[indices] != 0).all()) and bool((indices.diff() > 0).all())  # non-target, in U's order
    assert torch.equal(ActivationEditing(seed=3)._checked_images(unseen, 0), checked)  # the seed fixes them
    assert not torch.equal(ActivationEditing(seed=4)._checked_images(unseen, 0), checked)
    few = UnseenData(images[:100], labels[:100])  # 90 non-target images: all of them
    assert torch.equal(ActivationEditing(seed=3)._checked_images(few, 0), images[:100][labels[:100] != 0])



def test_the_added_triggers_read_a_seeded_subset_of_a_large_unseen_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """On more than ``ADDED_TRIGGER_IMAGES`` non-target images, the moves the edit adds are applied to that many of
    them (seeded, in U's order) and their sums scaled up to all: the triggered keys' weight is the same as with every
    image, each move costs a pass of the subset alone, and the moves still end near the floor."""
    from lightning_backdoor.defenses import activation_editing
    data = digits()
    data.setup("fit")
    unseen_set = data.unseen_set(10, 0)  # 100 images, 90 not of target class 0
    unseen = UnseenData(unseen_set.images.float() / 255, unseen_set.labels)
    knowledge = BackdoorKnowledge.of(BadNets(size=3), 0)
    full = ActivationEditing(layer="features.2", shift=2).fit(trained().eval(), unseen, knowledge)
    assert "added_trigger_images" not in full.info and all(member.rows is None for member in full.triggered)
    passes: list[int] = []
    capture = activation_editing.capture
    monkeypatch.setattr(activation_editing, "capture", lambda model, layers, images, **options: (
        passes.append(len(images)) or capture(model, layers, images, **options)))
    monkeypatch.setattr(activation_editing, "ADDED_TRIGGER_IMAGES", 30)
    editing = ActivationEditing(layer="features.2", shift=2)
    fit = editing.fit(trained().eval(), unseen, knowledge)
    added = len(fit.triggered) - 1
    assert added >= 1 and fit.info["added_trigger_images"] == 30, fit.info
    rows = fit.triggered[1].rows
    assert len(rows) == 30 and bool((fit.labels[rows] != 0).all()) and bool((rows.diff() > 0).all())
    assert all(torch.equal(member.rows, rows) for member in fit.triggered[1:]) and fit.triggered[0].rows is None
    assert torch.equal(editing._added_rows(fit.labels, 0), rows)  # the seed fixes them
    assert not torch.equal(ActivationEditing(seed=1)._added_rows(fit.labels, 0), rows)
    assert passes[-added - 1:] == [len(fit.labels)] + [30] * added  # the trigger on all images, each move on 30
    torch.testing.assert_close(fit.problem.triggered_count, full.problem.triggered_count)  # scaled up to all
    assert not torch.allclose(fit.problem.triggered_moment, full.problem.triggered_moment)
    edited = trained().eval()
    editing.defend(edited, unseen, knowledge)
    data.setup("test")
    images, labels = data.test_dataset().tensors[:2]
    with torch.no_grad():
        floor = (edited(images[labels != 0].float() / 255).argmax(-1) == 0).float().mean().item()
    for member in fit.triggered:
        assert trigger_success_rate(edited, member.trigger, 0, in_batches(images, labels)) <= floor + 0.1
    alone = ActivationEditing(layer="features.2", shift=0, mirror=False).fit(trained().eval(), unseen, knowledge)
    assert len(alone.triggered) == 1 and "added_trigger_images" not in alone.info  # nothing added, nothing said
