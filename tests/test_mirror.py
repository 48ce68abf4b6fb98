"""The trigger's mirror image: a model trained with random horizontal flips learns it besides the trigger (measured
on the CIFAR-10 BadNets model: 95 % ASR, 94 % left after an edit with the given trigger alone). The edit adds it
when it works on the unseen images, and every report measures it on the test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from callback_models import digits, trained

from lightning_backdoor import DefenseCallback
from lightning_backdoor.defenses import ActivationEditing
from lightning_backdoor.defenses.report import mirror_left
from lightning_backdoor.defenses.inversion import FeatureTrigger
from lightning_backdoor.triggers import SIG, BadNets, Blended, Mirrored, distinct_mirror


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
    callback = DefenseCallback(defense=ActivationEditing(layer="fc", mirror=mirror))
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
