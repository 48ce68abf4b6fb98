"""A defense's stages evaluated as versions of one live model (:class:`StageVersions`): each version's logits are
those of a model holding its state, the graph before an edited layer runs once per batch for all of them, and
the report's figures are those of one whole evaluation per stage."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from callback_models import digits, trained
from torch import nn

from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, TestData, UnseenData, run_defense
from lightning_backdoor.defenses import report as report_module
from lightning_backdoor.defenses.report import _augmentations_to_measure, augmented_asr
from lightning_backdoor.defenses.stages import StageVersions
from lightning_backdoor.evaluation import evaluate_batches, in_batches
from lightning_backdoor.models import build_model
from lightning_backdoor.triggers import BadNets


def versions_of(net: nn.Module, layers: list[str]) -> list[dict[str, torch.Tensor]]:
    """``net``'s state, then two versions with each of ``layers``' weights changed at random."""
    states = [copy.deepcopy(net.state_dict())]
    for scale in (0.05, 0.1):
        state = copy.deepcopy(states[0])
        for layer in layers:
            state[f"{layer}.weight"] = state[f"{layer}.weight"] + scale * torch.randn_like(state[f"{layer}.weight"])
        states.append(state)
    return states


def whole(net: nn.Module, state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(net)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("spec,layers,split", [
    ("preact_resnet18", ["layer4.1.conv1"], True),  # one layer: the graph before it runs once
    ("compact", ["blocks.2.conv2"], True),
    ("compact", ["blocks.1.conv2", "head"], False),  # two layers: whole passes
])
def test_each_version_gives_the_logits_of_a_model_holding_its_state(spec, layers, split) -> None:
    torch.manual_seed(0)
    net = build_model(spec, num_classes=10, in_channels=3).eval()
    states = versions_of(net, layers)
    forward = StageVersions(net, states, layers[0])
    images = torch.rand(6, 3, 32, 32)
    expected = [whole(net, state, images) for state in states]
    counted: list[int] = []
    first = next(module for module in net.modules() if isinstance(module, nn.Conv2d))
    handle = first.register_forward_hook(lambda module, args, output: counted.append(len(args[0])))
    for _ in range(2):  # a second batch: records replaced
        logits = forward(images)
        for ours, theirs in zip(logits, expected, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert (forward.reason is None) == split, forward.reason
    # the first conv ran: once per batch, plus the first images' check, with the split; once per version without
    assert sum(counted) == (2 * (6 + 4) if split else 2 * 3 * 6), counted
    for key, value in states[-1].items():  # the model ends in the last version's state, exactly
        assert torch.equal(net.state_dict()[key], value), key


def test_versions_that_do_not_differ_run_once() -> None:
    net = build_model("compact", num_classes=10, in_channels=3).eval()
    forward = StageVersions(net, [net.state_dict(), copy.deepcopy(net.state_dict())], "head")
    images = torch.rand(3, 3, 32, 32)
    logits = forward(images)
    assert len(logits) == 2 and torch.equal(logits[0], logits[1]) and forward.reason == "the versions do not differ"


def digits_unseen_and_test(per_class: int) -> tuple[UnseenData, TestData]:
    """The digits data's unseen images (``per_class`` per class, seed 0, pixels) and its test split with the BadNets
    trigger toward class 0, as the report's evaluation reads them."""
    data = digits()
    data.setup("fit")
    unseen_set = data.unseen_set(per_class, 0)
    data.setup("test")
    images, labels, triggered, attack = data.test_dataset().tensors
    return (UnseenData(unseen_set.images.float() / 255, unseen_set.labels),
            TestData(in_batches(images, labels, triggered, attack, batch_size=128), len(labels), 10, 0,
                     trigger=BadNets(size=3)))


def test_the_report_figures_are_those_of_one_whole_evaluation_per_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits model defended with a repair forced (three stages; forced without its guard, the repair gives the
    backdoor back here): each stage's CA, ASR, TA, per-class accuracy, mirrored and moved ASR equal a whole
    evaluation of a model holding that stage's weights."""
    unseen, test = digits_unseen_and_test(10)
    model = trained().eval()
    original = copy.deepcopy(model)
    made: list[StageVersions] = []
    monkeypatch.setattr(report_module, "StageVersions", lambda *args: made.append(StageVersions(*args)) or made[-1])
    report = run_defense(model, ActivationEditing(layer="features.2", shift=2, repair_tolerance=-1.0), unseen,
                         BackdoorKnowledge.of(BadNets(size=3), 0), test)
    assert report.result.repaired, report.result.details  # three stages, two of them edited
    assert len(made) == 1 and made[0].reason is None and made[0].count == 3  # the graph before the layer shared
    edited = copy.deepcopy(model)
    edited.load_state_dict(report.result.stages["after_edit"], strict=False)
    mirror, moves, _ = _augmentations_to_measure(test, unseen.images)
    assert moves  # the moves are measured too
    for stage, network in (("before", original), ("after_edit", edited), ("after", model)):
        expected = evaluate_batches(network, test.batches, 10, 0) | augmented_asr(network, mirror, moves, 0,
                                                                                  test.batches)
        assert report.stages[stage] == expected, stage
    assert report.stages["before"]["asr"] > 0.8 > report.stages["after_edit"]["asr"]  # the stages do differ


def test_a_jittered_solve_is_among_the_reports_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edit's linear system needed a jitter (:func:`~lightning_backdoor.defenses.editing.positive_definite_factor`,
    here forced by a factorisation that fails until the diagonal grows): the report says so, and the warning is still
    shown where it was raised."""
    from lightning_backdoor.defenses import editing

    unseen, test = digits_unseen_and_test(5)
    cholesky = torch.linalg.cholesky_ex
    first = []

    def failing_once(system: torch.Tensor, **kwargs):
        factor, info = cholesky(system, **kwargs)
        if not first:  # the first, unjittered try of the first solve fails
            first.append(system)
            return factor, torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(editing.torch.linalg, "cholesky_ex", failing_once)
    with pytest.warns(editing.JitterWarning, match="not positive definite"):
        report = run_defense(trained().eval(), ActivationEditing(layer="features.2", method="closed_form",
                                                                 strength=10.0, repair=False),
                             unseen, BackdoorKnowledge.of(BadNets(size=3), 0), test)
    assert any(line.startswith("1 of the edit's linear solves") and "not positive definite" in line
               for line in report.warnings), report.warnings


def test_warnings_of_a_defense_that_raises_are_still_shown() -> None:
    """A warning raised during the defense is re-emitted even when the defense then fails (it may say why)."""
    from lightning_backdoor.defenses.base import Defense

    class WarnsThenFails(Defense):
        def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None):
            warnings.warn("the unseen images look odd", UserWarning)
            raise ValueError("the defense failed")

    unseen, test = digits_unseen_and_test(2)
    with pytest.warns(UserWarning, match="look odd"), pytest.raises(ValueError, match="defense failed"):
        run_defense(trained().eval(), WarnsThenFails(), unseen, BackdoorKnowledge.of(BadNets(size=3), 0), test)
