"""Trigger estimation with a pre-screen of every class and the full inversion for the suspects only: the target
stays among the suspects, the verdicts match the exhaustive estimate's on the quickstart's backdoored model (its
two flagging inversions) and clean model (all five), a continued class follows the optimisation it would have
followed, and bad settings are refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_backdoor.defenses import UnseenData
from lightning_backdoor.defenses.estimation import (TriggerEstimator, middle_classes, prescreen_order,
                                                   suspects)
from lightning_backdoor.defenses.inversion import INVERSIONS, InversionRun
from lightning_backdoor.models import CompactNet
from lightning_backdoor.runs import instantiate_run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
EXHAUSTIVE = {"prescreen_steps": None, "early_stop": "all"}  # the estimator as it was before the pre-screen
PRESCREENED = {"prescreen_steps": 20, "prescreen_min_classes": 3}  # the pre-screen, also on 10-class models


def test_suspects_are_the_smallest_successful_classes_and_close_calls() -> None:
    sizes = torch.tensor([30.0, 5.0, 12.0, 2.0, 13.0, 40.0, 1.0, 20.0])
    succeeded = torch.tensor([True, True, True, True, True, True, False, True])
    order = prescreen_order(sizes, succeeded)
    assert order == [3, 1, 2, 4, 7, 0, 5, 6]  # class 6 is small but never reached the success rate: last
    assert suspects(order, sizes, 3, 0.1) == (3, 1, 2, 4)  # 13 <= 1.1 * 12: a close call continues
    assert suspects(order, sizes, 3, 0.0) == (3, 1, 2)
    assert suspects(order, torch.ones(8), 2, 0.05) == (3, 1, 2, 4)  # a tight spread: at most twice the count
    # references: the classes nearest the middle of the order (positions 3.5 -> 4 and 3), suspects excluded
    assert middle_classes(order, (3, 1, 2, 4), 2) == (7, 0)
    assert middle_classes(order, (3, 1, 2), 2) == (4, 7)


def test_a_continued_class_follows_the_optimisation_of_the_exhaustive_run() -> None:
    torch.manual_seed(0)
    model = CompactNet(num_classes=6, in_channels=1, widths=(8, 8, 8)).eval()
    images, labels = torch.rand(30, 1, 12, 12), torch.arange(6).repeat(5)
    results = []
    for narrowed in (False, True):
        generator = torch.Generator().manual_seed(0)
        inversion = INVERSIONS["neural_cleanse"].create(model, images, 6, generator, "auto")
        run = InversionRun(inversion, patience=1000)
        settings = {"bf16": False, "generator": generator, "progress": False}
        run.run(model, images, labels, 10, **settings)
        if narrowed:
            run.keep(torch.tensor([1, 4]))  # parameters, Adam moments and costs carry over
        run.run(model, images, labels, 20, **settings)
        results.append(run.finish(model, images, labels, bf16=False,
                                  measured=torch.tensor([False, True, False, False, True, False])))
    exhaustive, screened = results
    torch.testing.assert_close(screened.sizes[[1, 4]], exhaustive.sizes[[1, 4]])
    assert screened.class_steps.tolist() == [10, 30, 10, 10, 30, 10] and exhaustive.class_steps.tolist() == [30] * 6
    assert math.isnan(screened.success[0]) and not math.isnan(screened.success[1])  # measured where fully inverted


def test_each_class_stops_on_its_own() -> None:
    torch.manual_seed(0)
    model = CompactNet(num_classes=5, in_channels=1, widths=(8, 8, 8)).eval()
    images, labels = torch.rand(25, 1, 12, 12), torch.arange(5).repeat(5)
    inversion = INVERSIONS["perturbation"].create(model, images, 5, torch.Generator().manual_seed(0), "auto")
    run = InversionRun(inversion, patience=3, early_stop="class")
    run.run(model, images, labels, 200, generator=torch.Generator().manual_seed(0), progress=False)
    result = run.finish(model, images, labels)
    converged = result.converged
    assert converged.any() and (result.class_steps[converged] < 200).all()  # stopped once no longer improving
    assert result.steps == int(result.class_steps.max())


def test_the_prescreen_runs_from_16_classes_when_asked() -> None:
    torch.manual_seed(0)
    model = CompactNet(num_classes=10, in_channels=1, widths=(8, 8, 8)).eval()
    unseen = UnseenData(torch.rand(50, 1, 12, 12), torch.arange(10).repeat(5))
    settings = {"estimators": ("perturbation",), "max_steps": 8, "prescreen_steps": 4, "progress": False}
    default = TriggerEstimator(**settings).estimate(model, unseen).details
    assert default["prescreen_steps"] is None and default["screened_out"] == {"perturbation": []}
    forced = TriggerEstimator(**(settings | {"prescreen_min_classes": 3})).estimate(model, unseen).details
    assert forced["prescreen_steps"] == 4 and len(forced["screened_out"]["perturbation"]) >= 10 - 2 * 3 - 2
    assert len(forced["prescreen_size"]["perturbation"]) == 10
    assert not TriggerEstimator(max_steps=10).prescreens(40)  # a pre-screen as long as the inversion: exhaustive
    assert not TriggerEstimator().prescreens(40)  # opt-in
    asked = TriggerEstimator(prescreen_steps=20)
    assert asked.prescreens(16) and not asked.prescreens(15)


def test_a_close_call_is_confirmed_by_the_exhaustive_inversion() -> None:
    """A pre-screened flag with a size ratio above ``confirm_ratio`` is decided by the same inversion run
    exhaustively from the same start: its sizes are the exhaustive estimate's, to the last bit; a flag below it is
    not re-run."""
    torch.manual_seed(0)
    model = CompactNet(num_classes=10, in_channels=1, widths=(8, 8, 8)).eval()
    unseen = UnseenData(torch.rand(50, 1, 12, 12), torch.arange(10).repeat(5))
    # every class flaggable (no threshold, no size limit): the smallest trigger is always flagged
    settings = {"estimators": ("perturbation",), "max_steps": 8, "progress": False, "threshold": -math.inf,
                "max_size_ratio": 1.0}
    screened = {"prescreen_steps": 4, "prescreen_min_classes": 3}
    exhaustive = TriggerEstimator(**settings).estimate(model, unseen)
    confirmed = TriggerEstimator(**settings, **screened, confirm_ratio=0.0).estimate(model, unseen)
    record = confirmed.details["confirmed"]["perturbation"]
    assert confirmed.details["trigger_size"] == exhaustive.details["trigger_size"]
    assert confirmed.target_class == exhaustive.target_class and confirmed.details["screened_out"]["perturbation"] == []
    assert record["exhaustive_ratio"] == exhaustive.details["size_ratio"]["perturbation"][record["class"]]
    kept = TriggerEstimator(**settings, **screened, confirm_ratio=1.0).estimate(model, unseen)  # nothing above 1
    assert kept.details["confirmed"] == {} and kept.details["screened_out"]["perturbation"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"prescreen_steps": 0}, r"prescreen_steps=0 must be >= 1 or None"),
    ({"candidates": 0}, r"candidates=0 must be >= 1"),
    ({"references": -1}, r"references=-1 and candidate_margin=0.05 >= 0"),
    ({"confirm_ratio": -0.1}, r"confirm_ratio=-0.1 must be >= 0"),
    ({"early_stop": "never"}, r"early_stop='never' must be 'class'"),
    ({"seed": 2 ** 63}, r"seed=9223372036854775808 must be an integer in \[0, 2\*\*63\)"),
    ({"seed": -1}, r"seed=-1 must be an integer"),
    ({"seed": 1.5}, r"seed=1.5 must be an integer"),
    ({"seed": True}, r"seed=True must be an integer"),
    ({"estimators": ("feature", "blend", "feature")}, r"names an estimator twice"),
    ({"estimators": "feature"}, r"estimators='feature' must name one or more estimators as a list"),
    ({"estimators": ()}, r"estimators=\(\) must name one or more"),
])
def test_bad_prescreen_settings_are_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        TriggerEstimator(**settings)
    assert "\n" not in str(error.value)


def _estimates(run: Path, overrides: list[str] | None, estimators: tuple[str, ...]) -> tuple[dict, dict, int | None]:
    module, data = instantiate_run([QUICKSTART], run / "checkpoints" / "poisoned.ckpt", overrides)
    network = module.net.float().eval()
    unseen_set = data.unseen_set(10)
    unseen = UnseenData(unseen_set.images.float() / 255, unseen_set.labels)
    exhaustive = TriggerEstimator(progress=False, estimators=estimators, **EXHAUSTIVE).estimate(network, unseen)
    screened = TriggerEstimator(progress=False, estimators=estimators, **PRESCREENED).estimate(network, unseen)
    return exhaustive.details | {"target": exhaustive.target_class}, screened.details | {
        "target": screened.target_class}, data.target_class


def test_the_prescreen_keeps_the_target_and_the_verdict(quickstart_run: Path) -> None:
    # the two inversions that flag the quickstart's 3x3 patch (Neural Cleanse and perturbation on the quickstart
    # model: docs/results/estimation-scaling.md), not all five: each inversion takes 5-13 s per estimate here
    exhaustive, screened, target = _estimates(quickstart_run, None, ("neural_cleanse", "perturbation"))
    assert exhaustive["target"] == screened["target"] == target == 0
    # the target is a suspect of every estimator that flags it exhaustively, and flagged by at least one of them
    assert exhaustive["flagged_by"] and set(screened["flagged_by"]) & set(exhaustive["flagged_by"])
    for name in exhaustive["flagged_by"]:
        assert 0 in screened["fully_inverted"][name] and 0 not in screened["screened_out"][name]
    for name in screened["screened_out"]:  # the report says which classes were screened out, the rest ran fully
        assert sorted(screened["screened_out"][name] + screened["fully_inverted"][name]) == list(range(10))
        assert all(screened["inversion_success"][name][label] is None for label in screened["screened_out"][name])
    assert any(screened["screened_out"].values())  # with 10 classes the pre-screen already screens some out


def test_the_prescreen_flags_nothing_on_the_clean_model(clean_quickstart_run: Path) -> None:
    """The clean quickstart model (its exhaustive estimate finds nothing: test_estimation.py), pre-screened with the
    close-call confirmation: no backdoor found, and any close call it met was decided by the exhaustive inversion."""
    module, data = instantiate_run([QUICKSTART], clean_quickstart_run / "checkpoints" / "poisoned.ckpt",
                                   ["--data.init_args.poison_rate=0"])
    unseen_set = data.unseen_set(10)
    unseen = UnseenData(unseen_set.images.float() / 255, unseen_set.labels)
    screened = TriggerEstimator(progress=False, **PRESCREENED).estimate(module.net.float().eval(), unseen)
    assert screened.target_class is None and screened.details["flagged_by"] == []
    assert any(screened.details["screened_out"].values())  # the pre-screen did run
    for name, record in screened.details["confirmed"].items():
        assert record["exhaustive_ratio"] == screened.details["size_ratio"][name][record["class"]]
