"""DefenseCallback's outputs: what the trainer tests afterwards, smoke runs, pixel space vs normalised model input,
near-chance accuracy, and the report without a test trigger."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from callback_models import MEAN, STD, NormalisingDigits, digits, normalise, quiet_trainer, trained
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor import DefenseCallback
from lightning_backdoor.dashboard import summary_rows
from lightning_backdoor.defenses import ActivationEditing, DefenseResult, EstimateFirst, UnseenData
from lightning_backdoor.defenses.estimation import BackdoorEstimate, TriggerEstimator
from lightning_backdoor.defenses.report import (DefenseReport, SharedImages, backdoor_left, class_order_line,
                                                estimation_line, greyscale_line, near_chance, selection_line,
                                                trigger_inactive)
from lightning_backdoor.defenses.report_plot import plot_report
from lightning_backdoor.models.input_transform import InputTransform, input_transform_of
from lightning_backdoor.triggers import BadNets, Trigger

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROOT = Path(__file__).resolve().parents[1]
#: the digits test split: 300 images, 270 of them not of the target class (the ASR's denominator)
TEST_IMAGES, ATTACKED_IMAGES = 300, 270


def defense_outputs(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.startswith(("defended", "defense_report", "estimated"))]


# --- 1. what trainer.test() loads afterwards ---------------------------------------------------------------------

@pytest.mark.parametrize(("ckpt_path", "defended"), [("default", True), ("best", True), ("last", False)])
def test_trainer_test_after_fit_tests_the_defended_weights(ckpt_path: str, defended: bool, tmp_path: Path) -> None:
    data = digits()
    callback = DefenseCallback(defense=ActivationEditing(layer="fc"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = quiet_trainer(tmp_path, [callback, checkpoints], max_steps=1, enable_checkpointing=True)
    trainer.fit(trained(), datamodule=data)  # lr 0: the checkpoints hold the backdoored weights
    report = callback.report.to_json()
    # the default (no ckpt_path: Lightning's "best") loaded the poisoned checkpoint before the fix
    (result,) = (trainer.test(datamodule=data, verbose=False) if ckpt_path == "default" else
                 trainer.test(datamodule=data, ckpt_path=ckpt_path, verbose=False))
    # "last" stays the fit's last checkpoint (undefended, as documented); one image of slack for float rounding
    expected = report["after" if defended else "before"]
    assert abs(result["test/asr"] - expected["asr"]) <= 1 / ATTACKED_IMAGES, (result, expected)
    assert abs(result["test/clean_acc"] - expected["clean_acc"]) <= 1 / TEST_IMAGES, (result, expected)
    assert report["before"]["asr"] >= 0.8 and report["after"]["asr"] <= report["before"]["asr"] / 4
    # loading a fit checkpoint restores its ModelCheckpoint state (the poisoned best path); "best" stays defended
    assert checkpoints.best_model_path == str(tmp_path / "defended.ckpt") == str(callback.checkpoint_path)
    (again,) = trainer.test(datamodule=data, verbose=False)
    assert abs(again["test/asr"] - report["after"]["asr"]) <= 1 / ATTACKED_IMAGES, (again, report["after"])


def test_cli_test_in_a_later_process_refuses_best_and_tests_the_defended_file(tmp_path: Path, capsys) -> None:
    """A later process has no trainer state: `test --ckpt_path best` is refused in one line (Lightning's: no best
    model known), never the poisoned checkpoint; the defended file given by path tests as the report says."""
    from lightning_backdoor.cli import main

    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["trainer"] |= {"max_epochs": 4, "logger": False, "precision": "32-true"}
    config["model"]["init_args"]["model_kwargs"] = {"widths": [16, 32, 64]}
    config["data"]["init_args"] |= {"poison_rate": 0.2, "batch_size": 64}  # learnt in 4 epochs (ASR 100 % measured)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    root = tmp_path / "run"
    arguments = ["--config", str(tmp_path / "config.yaml"), f"--trainer.default_root_dir={root}",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    main(["fit", *arguments])
    report = json.loads((root / "defense_report.json").read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *arguments, "--ckpt_path=best"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lightning-backdoor: error: ") and 'ckpt_path="best"' in line, line
    main(["test", *arguments, f"--ckpt_path={root / 'defended.ckpt'}"])
    printed = capsys.readouterr().out
    tested = {name: float(re.search(rf"test/{name}\W+([0-9.]+)", printed).group(1)) for name in ("asr", "clean_acc")}
    # mnist5k's test split: 1000 images, 900 attacked; one image of slack
    assert abs(tested["asr"] - report["after"]["asr"]) <= 1 / 900 and report["before"]["asr"] >= 0.8, tested
    assert abs(tested["clean_acc"] - report["after"]["clean_acc"]) <= 1 / 1000, tested


# --- 3. smoke runs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("smoke", [{"fast_dev_run": True}, {"fast_dev_run": 2}, {"limit_train_batches": 0},
                                   {"max_steps": 0}], ids=["fast_dev_run", "fast_dev_run=2", "no_batches", "no_steps"])
def test_a_smoke_run_writes_no_defense_outputs(smoke: dict[str, Any], tmp_path: Path, caplog) -> None:
    callback = DefenseCallback(defense=ActivationEditing(layer="fc"))
    caplog.set_level(logging.INFO)
    quiet_trainer(tmp_path, [callback], **({"max_epochs": 1} | smoke)).fit(trained(), datamodule=digits())
    assert defense_outputs(tmp_path) == [] and callback.report is None
    skipped = [record.getMessage() for record in caplog.records if record.getMessage().startswith("defense: skip")]
    assert len(skipped) == 1, skipped


# --- 4. pixel space vs a model trained on normalised images --------------------------------------------------------

NORMALIZE = {"mean": MEAN, "std": STD}


def normalised_unseen() -> DataLoader:
    """The 100 unseen digits, normalised as the training batches were (what a user's own loader would yield)."""
    unseen = digits().unseen_set()
    return DataLoader(TensorDataset(normalise(unseen.images.float() / 255), unseen.labels), batch_size=50)


def with_own_transform(model: nn.Module) -> nn.Module:
    InputTransform(MEAN, STD).attach(model)
    return model


# (id, the callback's arguments, whether the module normalises itself, whether a line says images were undone)
PIXEL_CASES = [("normalize", {"normalize": NORMALIZE}, False, False),
               ("normalize, normalised unseen loader",
                {"normalize": NORMALIZE, "unseen_dataloader": normalised_unseen()}, False, True),
               ("the module's own transform, equal normalize", {"normalize": NORMALIZE}, True, False),
               ("the module's own transform only", {}, True, False)]


@pytest.mark.parametrize(("arguments", "own", "undone"), [case[1:] for case in PIXEL_CASES],
                         ids=[case[0] for case in PIXEL_CASES])
def test_a_model_trained_on_normalised_batches_is_defended_in_pixel_space(arguments: dict[str, Any], own: bool,
                                                                          undone: bool, tmp_path: Path,
                                                                          caplog) -> None:
    caplog.set_level(logging.INFO)
    model = trained(normalised=True)
    if own:  # the module reads pixels itself; its data module must then hand it pixels
        with_own_transform(model)
    data = digits() if own else digits(NormalisingDigits)  # batches normalised by the data module, pixels kept
    callback = DefenseCallback(defense=ActivationEditing(layer="fc"), **arguments)
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(model, datamodule=data)
    before, after = callback.report.before, callback.report.after
    # trained 12 epochs on normalised digits: ASR 98 %, CA 99 % on the 300 test pixels read through the transform;
    # the edit removes the backdoor: a quarter of the ASR (measured 0 %) and CA within 3 points (9 images)
    assert before["asr"] >= 0.8 and before["clean_acc"] >= 0.85, before
    assert after["asr"] <= before["asr"] / 4 and after["clean_acc"] >= before["clean_acc"] - 0.03, after
    # the callback's transform is detached again: the module reads what its loaders give it, as before
    assert (input_transform_of(model) is not None) == own
    lines = [record.getMessage() for record in caplog.records if "undoing normalize" in record.getMessage()]
    assert len(lines) == int(undone), lines


# --- 5. near chance ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("correct", "total", "classes", "near"), [
    (10, 100, 10, True),      # exactly chance
    (0, 100, 10, True),       # below chance: every label shifted by one class
    (10, 50, 10, True),       # 20 %: P(X >= 10 | guessing) = 2.5 % > 1 %
    (11, 50, 10, False),      # 22 %: P = 0.9 %
    (4, 10, 10, True),        # 40 % of 10 images: P = 1.3 %
    (5, 10, 10, False),       # 50 % of 10 images: P = 0.16 %
    (1500, 10000, 10, True),  # 15 %: far above chance by the test, but a tenth of the way to 100 % is 19 %
    (1950, 10000, 10, False),
    (60, 100, 2, True),       # 60 % of 100 binary: P = 2.8 %
    (70, 100, 2, False),
    (9, 10, 10, False),
])
def test_near_chance(correct: int, total: int, classes: int, near: bool) -> None:
    assert near_chance(correct, total, classes) is near


def test_a_test_trigger_that_barely_works_before_the_defense_is_said_to_be_so() -> None:
    """A trigger or target_class that is not the model's, or a model without that backdoor: ASR at its floor before
    the defense. The report says so, since the ASR after it then says nothing about a backdoor."""
    assert trigger_inactive({"asr": 0.1304, "asr_floor": 0.1276}) == (
        "the test trigger barely works before the defense: ASR 13.0 % against a floor of 12.8 % on the test images; "
        "check the trigger and target_class (position, size, colour) and the preprocessing (normalize), or the model "
        "holds no such backdoor; the model was defended all the same, and the ASR after it says nothing about a "
        "backdoor")
    assert "the model was left unchanged" in trigger_inactive({"asr": 0.02, "asr_floor": 0.02},
                                                               "editing/no_backdoor_found")
    assert trigger_inactive({"asr": 0.9479, "asr_floor": 0.0211}) is None  # a working backdoor
    assert trigger_inactive({"asr": 0.5000, "asr_floor": 0.0211}) is None  # half the images: no approximation said
    assert trigger_inactive({"asr": 0.9479}) is None  # no floor: nothing to compare with


def test_greyscale_unseen_images_for_a_colour_model_are_said_to_be_so() -> None:
    """A new user's greyscale copies of their unseen images, for an RGB model: the defense lost 16 pt of the target
    class that its repair check, run on those images, did not see. A colour set holding a few colourless pictures
    (CIFAR-10's test split: 1 %), or a greyscale model, says nothing."""
    generator = torch.Generator().manual_seed(0)
    colour = torch.rand(10, 3, 8, 8, generator=generator)
    grey = colour.clone()
    grey[:6] = colour[:6, :1].expand(6, 3, 8, 8)
    assert greyscale_line(grey) == (
        "6 of the 10 unseen images are greyscale, repeated into the model's 3 channels: a model trained on colour "
        "images may answer them otherwise, and the repair's check runs on them (a new user's lost 16 pt of "
        "target-class accuracy unseen); use colour images if you have them, and check target_acc")
    grey[5] = colour[5]  # half, not most
    assert greyscale_line(grey) is None and greyscale_line(colour) is None
    assert greyscale_line(colour[:, :1]) is None  # a greyscale model reads greyscale images


def test_labels_in_another_order_than_the_models_are_said_to_be_so() -> None:
    """Two class folders swapped (a new user's cat and dog, 500 test images a class): each is predicted as the
    other more often than as itself, significantly, while the accuracy over all classes (56 %) stays far from
    chance. A model's own confusion of a few images, or of one class alone, is not flagged."""
    confusion = torch.diag(torch.full((10,), 300))
    confusion[0, 7] = 150  # class 0 loses a third to class 7: a confusion, its own count stays larger
    confusion[3, 3], confusion[3, 5], confusion[5, 5], confusion[5, 3] = 110, 235, 100, 225
    assert class_order_line(confusion) == (
        "test images are predicted as another class more often than as their own: label 3 as 5 (235 images, 110 as "
        "3), label 5 as 3 (225 images, 100 as 5); are the class folders or names (--classes) in the model's label "
        "order? Every accuracy here is computed with these labels")
    confusion[5, 5], confusion[5, 3] = 225, 100  # one label alone: a model's confusion
    assert class_order_line(confusion) is None
    few = torch.diag(torch.full((10,), 10))  # 10 images a class: 5 against 3 and 5 against 2 are not evidence
    few[3, 3], few[3, 5], few[5, 5], few[5, 3] = 3, 5, 2, 5
    assert class_order_line(few) is None
    # with the labels' names (those that are not their index)
    confusion[5, 5], confusion[5, 3] = 100, 225
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert "label 3 (cat) as 5 (dog) (235 images, 110 as 3), label 5 (dog) as 3 (cat)" in class_order_line(confusion,
                                                                                                          names)
    assert "label 3 as 5 (235" in class_order_line(confusion, tuple(map(str, range(10))))
    collapsed = torch.diag(torch.full((10,), 300))  # three labels taken for class 0: the inputs, not the order
    for label in (2, 4, 6):
        collapsed[label, label], collapsed[label, 0] = 60, 240
    line = class_order_line(collapsed)
    assert "label 2 as 0 (240 images, 60 as 2)" in line and "(normalize, image size)" in line, line
    assert "(normalize" not in class_order_line(confusion)  # a swap: the order alone is asked about


def test_unseen_images_among_the_test_images_are_counted() -> None:
    """A defender's own clean images taken from the test split: the defense is fitted on test images. Found by
    their 8-bit pixels, whether given as uint8 or as floats (un-normalised floats carry rounding error); one pixel
    off is another image."""
    generator = torch.Generator().manual_seed(0)
    test = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=generator)
    unseen = torch.cat([test[[3, 17, 17]].float() / 255 + 1e-4, torch.rand(5, 3, 8, 8, generator=generator)])
    shared = SharedImages(unseen)
    for start in range(0, 50, 20):  # batch by batch, as the evaluation reads them
        shared(test[start:start + 20])
    assert shared.line() == (
        "2 of the 7 distinct unseen images are also among the 50 test images (identical pixels): the defense was "
        "fitted on test images, so the test figures after it are partly measured on its own data; take the unseen "
        "images from outside the test split")
    moved = test.clone()
    moved[3, 0, 0, 0] ^= 1
    moved[17, 2, 7, 7] ^= 1
    fresh = SharedImages(unseen)
    fresh(moved)
    assert fresh.line() is None


def test_a_defense_fitted_on_test_images_says_so_in_its_report(tmp_path: Path) -> None:
    """End to end: the unseen loader holds 30 of the test loader's images; the report's warning counts them, and
    a defense whose unseen images are the data module's own split warns of nothing of the kind."""
    data = digits()
    unseen, (images, labels) = data.unseen_set(), data.test_dataset().tensors[:2]
    mixed = torch.cat([unseen.images[:70], images[:30]]), torch.cat([unseen.labels[:70], labels[:30]])
    callback = DefenseCallback(defense=ActivationEditing(layer="fc"), unseen_dataloader=pixel_loader(*mixed))
    callback.defend(trained(), data, [], tmp_path / "mixed")
    warnings = json.loads(callback.report_path.read_text())["warnings"]
    assert any(line.startswith(f"30 of the {len(set(SharedImages.digests(mixed[0])))} distinct unseen images are "
                               f"also among the {len(labels)} test images") for line in warnings), warnings
    own = DefenseCallback(defense=ActivationEditing(layer="fc"))
    own.defend(trained(), data, [], tmp_path / "own")
    assert not any("also among" in line for line in json.loads(own.report_path.read_text())["warnings"])


@pytest.mark.parametrize("asr, floor", [(0.1893, 0.0504), (0.0800, 0.0211), (0.4999, 0.0211)])
def test_a_test_trigger_that_works_on_part_of_the_images_only_is_said_to_be_so(asr, floor) -> None:
    """A white square described for a coloured one (a new user's model): ASR 18.9 % before, 8.6 % after, while the
    attacker's trigger still worked on 96 % of the images. More than 5 pt above its floor, so not "barely works"; a
    learned backdoor reaches about 90 % or more."""
    warning = trigger_inactive({"asr": asr, "asr_floor": floor})
    assert warning.startswith(f"the test trigger works on part of the images only before the defense: ASR "
                              f"{100 * asr:.1f} % against a floor of {100 * floor:.1f} %")
    assert "describe it exactly" in warning


def test_a_backdoor_left_far_above_its_floor_is_said_to_be_reduced_not_removed() -> None:
    backdoored = {"asr": 0.9547, "asr_floor": 0.0596}
    assert backdoor_left(backdoored, {"asr": 0.2734, "asr_floor": 0.0527}) == (
        "the backdoor is reduced, not removed: ASR 27.3 % is 22.1 pt above its floor (5.3 %) on the test images; more "
        "unseen images, layer auto or strength null (chosen on the unseen split) may remove more")
    # the advice names only what was not tried: auto chose among layers here, at one strength
    chosen = {"selection": {"cross_validated_loss_on_unseen": {"blocks.2.fc2 λ=10.0": 1.2, "head λ=10.0": 1.5}}}
    assert backdoor_left(backdoored, {"asr": 0.2734, "asr_floor": 0.0527}, chosen).endswith(
        "; more unseen images or strength null (chosen on the unseen split) may remove more")
    both = {"selection": {"cross_validated_loss_on_unseen": {"a λ=1.0": 1.2, "b λ=3.0": 1.5}}, "trigger_known": False}
    assert backdoor_left(backdoored, {"asr": 0.2734, "asr_floor": 0.0527}, both).endswith(
        "; more unseen images may remove more; the trigger was estimated, and an estimate may remove less than the "
        "true trigger: defend with the trigger known if you have it")
    assert backdoor_left(backdoored, {"asr": 0.2734, "asr_floor": 0.0527}, {}, "FineTuning").endswith(
        "; more unseen images may remove more")  # a baseline has no layer or strength to choose
    # the estimation found nothing and the model is unchanged: not "reduced", but missed
    assert backdoor_left(backdoored, backdoored, {"trigger_known": False}, "editing/no_backdoor_found") == (
        "the trigger estimation found no backdoor and left the model unchanged, but the test trigger still succeeds: "
        "ASR 95.5 % against a floor of 6.0 % on the test images: the backdoor was missed; defend with the trigger "
        "known if you have it")
    assert backdoor_left(backdoored, {"asr": 0.0568, "asr_floor": 0.0496}) is None  # within 5 pt: removed
    assert backdoor_left({"asr": 0.06, "asr_floor": 0.05}, {"asr": 0.30, "asr_floor": 0.05}) is None  # no backdoor
    assert backdoor_left(backdoored, {"asr": 0.30}) is None  # no floor measured


def test_the_estimation_verdict_is_one_console_line() -> None:
    found = {"estimation": {"backdoor_found": True, "target_class": 0, "flagged_by": ["neural_cleanse"],
                            "anomaly_index": {"neural_cleanse": [9.02, 0.1], "feature": [3.85, -0.2]},
                            "size_ratio": {"neural_cleanse": [0.156, 1.0], "feature": [0.354, 1.1]}, "seconds": 76.2}}
    assert estimation_line(found) == ("trigger estimation: backdoor found, target class 0, flagged by neural_cleanse "
                                      "(anomaly index 9.02, size ratio 0.16), 76.2 s")
    clean = {"estimation": {"backdoor_found": False, "target_class": None, "flagged_by": [],
                            "anomaly_index": {"neural_cleanse": [1.5, 0.3], "blend": [0.2, 1.9]},
                            "size_ratio": {"neural_cleanse": [0.4, 1.0], "blend": [1.2, 0.62]}, "seconds": 30.0}}
    assert estimation_line(clean) == ("trigger estimation: no backdoor found (no class's trigger has a flagging "
                                      "anomaly index and size ratio; largest anomaly index 1.90: blend, class 1, size ratio 0.62; "
                                      "smallest size ratio 0.40: neural_cleanse, class 0, anomaly index 1.50), model "
                                      "left unchanged, 30.0 s")
    clean["estimation"] |= {"threshold": 2.0, "max_size_ratio": 0.3}  # the rule, as the estimation records it
    assert estimation_line(clean).startswith("trigger estimation: no backdoor found (no class's trigger has anomaly "
                                             "index above 2 with size ratio at most 0.3; largest")
    clean["estimation"]["anomaly_index"]["blend"] = ["inf", "-inf"]  # as a report read back from its file holds it
    assert "largest anomaly index inf: blend, class 0, size ratio 1.20" in estimation_line(clean)
    assert estimation_line({"layer": "fc"}) is None  # trigger known: no estimation


def test_wrong_class_order_is_refused_unless_accepted(tmp_path: Path) -> None:
    callback = DefenseCallback(defense=ActivationEditing(layer="fc"))
    with pytest.raises(ValueError, match=r"^the model is right on \d % of the 100 unseen images \(chance 10 %\): "
                                         r"wrong preprocessing \(normalize\?\), class order or architecture "
                                         r"\(e\.g\. a stem stride\)\? to defend anyway pass accept_low_accuracy=True "
                                         r"\(defend: --accept_low_accuracy true\)$"):
        quiet_trainer(tmp_path / "refused", [callback], max_steps=1).fit(trained("rolled"), datamodule=digits())
    assert defense_outputs(tmp_path) == []
    accepting = DefenseCallback(defense=ActivationEditing(layer="fc"), accept_low_accuracy=True)
    quiet_trainer(tmp_path / "accepted", [accepting], max_steps=1).fit(trained("rolled"), datamodule=digits())
    warnings = json.loads(accepting.report_path.read_text())["warnings"]
    assert len(warnings) == 4, warnings
    assert warnings[0].endswith("defended anyway (accept_low_accuracy)")
    # the test images say which: each label is predicted as its neighbour's
    assert warnings[1].startswith("test images are predicted as another class more often than as their own: label 0 "
                                  "as ")
    # read in another class order, the trigger's target is another class: the trigger seems not to work either
    assert warnings[2].startswith("the test trigger barely works before the defense")
    assert re.fullmatch(r"after the defense the model is right on \d+ % of the 300 test images \(chance 10 %\): "
                        r"near chance", warnings[3])


# --- 6. trigger unknown, no trigger for the test images ----------------------------------------------------------

class FoundEstimate(TriggerEstimator):
    """Stands in for a trigger estimation that found ``trigger`` toward ``target`` (or nothing)."""

    def __init__(self, trigger: Trigger | None, target: int | None) -> None:
        super().__init__()
        self.trigger, self.target = trigger, target

    def estimate(self, model: nn.Module, unseen: UnseenData, layer: str = "auto") -> BackdoorEstimate:
        return BackdoorEstimate(self.target, self.trigger, "stand-in", 0.0)


def pixel_loader(images: torch.Tensor, labels: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images.float() / 255, labels), batch_size=100)


@pytest.mark.parametrize("found", [True, False], ids=["backdoor found", "none found"])
def test_without_a_test_trigger_the_report_holds_the_estimated_triggers_asr(found: bool, tmp_path: Path,
                                                                            caplog) -> None:
    caplog.set_level(logging.INFO)
    data = digits()
    unseen, test = data.unseen_set(), data.test_dataset().tensors
    estimator = FoundEstimate(BadNets(size=3), 0) if found else FoundEstimate(None, None)
    defense = EstimateFirst(ActivationEditing(layer="fc"), estimator, every_candidate=False)
    callback = DefenseCallback(defense=defense, trigger_known=False,
                               unseen_dataloader=pixel_loader(unseen.images, unseen.labels),
                               test_dataloader=pixel_loader(test[0], test[1]))
    callback.defend(trained(), None, [], tmp_path)  # no data module: no trigger for the test images
    report = json.loads(callback.report_path.read_text())
    assert report["true_asr_measured"] is False and "asr" not in report["before"] and "der" not in report
    printed = next(record.getMessage() for record in caplog.records if "CA 0." in record.getMessage())
    assert "true ASR not measured" in printed
    if not found:
        assert "estimated_asr" not in report["before"] and "none estimated" in printed
        # nothing found and nothing to test with: the verdict is no evidence of a clean model, and says so
        assert report["warnings"][-1].startswith("the trigger estimation found no backdoor and left the model "
                                                 "unchanged; with no trigger to test the images with, this is no "
                                                 "evidence that the model is clean")
        return
    assert not any("no evidence" in warning for warning in report["warnings"])
    before, after = report["before"]["estimated_asr"], report["after"]["estimated_asr"]
    # the stand-in estimate is the true patch: its ASR is the backdoor's (97 %); the edit removes it (a quarter)
    assert report["estimated_target"] == 0 and before >= 0.8 and after <= before / 4, report
    assert f"estimated trigger toward class 0: ASR {before:.4f} -> {after:.4f}" in printed
    assert "; edited fc in " in printed  # the layer the edit chose, on the console
    assert "(the test split's evaluation before and after: " in printed  # where the rest of the wait went
    assert "estimated trigger's ASR" in [label.get_text() for label in plot_report(report).axes[0].get_xticklabels()]
    assert summary_rows(report)[0][-1] == round(100 * before, 2)  # the W&B summary table's last column


@pytest.mark.parametrize("clean_tests", ["test_dataloader", "test_trigger_false"])
def test_trigger_estimated_on_the_quickstart_model_without_a_test_trigger(quickstart_run: Path, tmp_path: Path,
                                                                          clean_tests: str) -> None:
    """End to end with the real estimation (the quickstart model: BadNets 3x3 toward 0, found by
    tests/test_estimation.py with all five inversions), its test images given without their trigger: as a loader
    of clean images, or as the data module's test split with ``test_trigger=False`` (what ``defend`` does when the
    data config names no trigger: the module's default BadNets patch must not be taken for the model's). The two
    inversions that flag this patch (tests/test_prescreen.py) suffice here: the others only add seconds."""
    from lightning_backdoor.runs import instantiate_run

    module, data = instantiate_run([str(ROOT / "configs" / "quickstart.yaml")],
                                   quickstart_run / "checkpoints" / "poisoned.ckpt")
    unseen, test = data.unseen_set(), data.test_dataset().tensors
    defense = EstimateFirst(ActivationEditing(), TriggerEstimator(estimators=("neural_cleanse", "perturbation")))
    if clean_tests == "test_dataloader":
        callback = DefenseCallback(defense=defense, trigger_known=False,
                                   unseen_dataloader=pixel_loader(unseen.images, unseen.labels),
                                   test_dataloader=pixel_loader(test[0], test[1]))
        report = callback.defend(module, None, [], tmp_path).to_json()
    else:
        with pytest.raises(ValueError, match="test_trigger=False .* needs trigger_known=false"):
            DefenseCallback(defense=defense, test_trigger=False)
        callback = DefenseCallback(defense=defense, trigger_known=False, test_trigger=False)
        report = callback.defend(module, data, [], tmp_path).to_json()
    assert report["true_asr_measured"] is False and report["estimated_target"] == 0
    assert "asr" not in report["before"] and "asr_floor" not in report["after"]
    before, after = report["before"]["estimated_asr"], report["after"]["estimated_asr"]
    # the estimate sends most test images to 0 before (it is a trigger that works, by construction of the
    # inversion) and few after the edit that maps it to clean values
    assert before >= 0.5 and after <= before / 4, (before, after)
    assert report["after"]["clean_acc"] >= report["before"]["clean_acc"] - 0.02


def test_the_console_line_gives_asr_against_its_floor_ca_and_ta() -> None:
    before = {"clean_acc": 0.9, "asr": 0.95, "asr_floor": 0.05, "target_acc": 0.8}
    after = {"clean_acc": 0.89, "asr": 0.06, "asr_floor": 0.04, "target_acc": 0.75}
    report = DefenseReport({"before": before, "after": after}, DefenseResult("editing/closed_form", 1.0), 100)
    assert report.summary_line() == "ASR 0.9500 -> 0.0600 (floor 0.0400), CA 0.9000 -> 0.8900, TA 0.8000 -> 0.7500"
    del before["target_acc"], after["target_acc"]  # all-to-all: no target class
    assert report.summary_line() == "ASR 0.9500 -> 0.0600 (floor 0.0400), CA 0.9000 -> 0.8900"


def test_the_chart_says_when_no_repair_was_applied():
    """Without a repair the last stage holds the edited weights: its bars are not called 'after repair'."""
    stage = {"clean_acc": 0.9, "asr": 0.5, "asr_floor": 0.01, "robust_acc": 0.4, "target_acc": 0.9}
    report = {"before": stage, "after_edit": stage, "after": stage, "defense": {"method": "editing/closed_form"}}
    for repaired, title in ((False, "after (no repair applied)"), (True, "after repair")):
        report["defense"]["repaired"] = repaired
        legend = [text.get_text() for text in plot_report(report).axes[0].get_legend().get_texts()]
        assert legend == ["before", "after edit", title]


def test_the_console_says_how_layer_auto_chose_the_layer():
    losses = {"blocks.2.conv1 λ=10.0": 1.092, "blocks.2.conv2 λ=10.0": 1.1068, "head λ=10.0": 1.4759}
    within = ["blocks.2.conv1", "blocks.2.conv2"]
    details = {"strength": 10.0, "selection": {"cross_validated_loss_on_unseen": losses, "standard_error": 0.086,
                                               "lowest": "blocks.2.conv1 λ=10.0",
                                               "layers_within_one_standard_error": within}}
    assert selection_line("blocks.2.conv2", details) == (
        "layer chosen by cross-validation on the unseen split: blocks.2.conv2 λ=10.0 (loss 1.1068), the deepest of "
        "blocks.2.conv1, blocks.2.conv2, within one standard error (0.0860) of the lowest, blocks.2.conv1 λ=10.0 "
        "(1.0920)")
    lowest = selection_line("blocks.2.conv1", details)
    assert lowest is not None and lowest.endswith("blocks.2.conv1 λ=10.0 (loss 1.0920), it had the lowest loss")
    details["selection"]["triggered_loss"] = "attack_log_loss"
    assert selection_line("blocks.2.conv1", details).endswith(
        "it had the lowest loss, triggered images scored by the attack's log-loss (one image per class)")
    assert selection_line("blocks.2.conv2", {"strength": 10.0}) is None  # a named layer: nothing was chosen
    assert selection_line(None, details) is None
