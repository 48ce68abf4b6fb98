"""docs/report.md names every key of ``defense_report.json``: three real reports, written by the ``DefenseCallback``
on the small backdoored ``digits`` model of callback_models.py (a few seconds in all), must hold no key the page
does not name, and the page's tables no key that neither these reports hold nor the code is known to write."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from callback_models import digits, trained
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor import DefenseCallback
from lightning_backdoor.defenses import ActivationEditing, EstimateFirst, UnseenData
from lightning_backdoor.defenses.estimation import BackdoorEstimate, TriggerEstimator
from lightning_backdoor.triggers import BadNets

PAGE = Path(__file__).resolve().parents[1] / "docs" / "report.md"

#: the stages, documented once as ``<stage>.<key>``
STAGES = ("before", "after_edit", "after")
#: objects whose keys vary (packages, layers, settings, estimators), by path -> the placeholder the page writes
VARIABLE = {"environment.packages": "<name>", "defense.selection.cross_validated_loss_on_unseen": "<option>",
            "defense.batchnorm_prior.norms": "<layer>", "defense.skipped_layers": "<layer>",
            "defense.repair.drop_with_repair": "<setting>", "defense.repair.triggered_rise_with_repair": "<setting>",
            **{f"defense.estimation.{name}": "<estimator>" for name in (
                "anomaly_index", "trigger_size", "size_ratio", "inversion_success", "steps", "estimator_seconds",
                "fully_inverted", "screened_out", "prescreen_size", "prescreen_shrink", "confirmed",
                "not_applicable")}}
#: objects whose keys the page documents under another object's (the same diagnostics, for the repaired edit)
SAME_KEYS = {"defense.diagnostics_after_repair": "defense.diagnostics"}
#: keys the page documents from the code that the reports below do not hold: rarer branches (a layer skipped for
#: memory, a close call confirmed, an estimator that cannot act, moved placements, a BatchNorm feeding the layer, an
#: unseen split of more than 256 non-target images) and what depends on the machine (a GPU, a git checkout)
DOCUMENTED_FROM_CODE = {
    "defense.added_trigger_images",
    "defense.skipped_layers.<layer>", "defense.batchnorm_prior.norms.<layer>",
    "defense.estimation.placements", "defense.estimation.confirmed.<estimator>",
    "defense.estimation.confirmed.<estimator>.class", "defense.estimation.confirmed.<estimator>.prescreened_ratio",
    "defense.estimation.confirmed.<estimator>.exhaustive_ratio", "defense.estimation.not_applicable.<estimator>",
    "environment.cuda", "environment.git.commit", "environment.git.dirty"}


def key_paths(report: dict[str, Any]) -> dict[str, bool]:
    """Every key of ``report`` as the page writes it (dotted, variable keys as their placeholder), with whether it
    holds an object; lists are values (per-class figures, warnings), not descended into."""
    paths: dict[str, bool] = {}

    def walk(value: Any, path: str) -> None:
        paths[path] = isinstance(value, dict)
        if isinstance(value, dict):
            prefix = SAME_KEYS.get(path, path)
            for key, child in value.items():
                walk(child, f"{prefix}.{VARIABLE.get(path, key)}")

    for key, value in report.items():
        paths[key] = isinstance(value, dict)
        if isinstance(value, dict):
            prefix = "<stage>" if key in STAGES else key
            for child_key, child in value.items():
                walk(child, f"{prefix}.{VARIABLE.get(key, child_key)}")
    return paths


def pixel_loader(images: torch.Tensor, labels: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images.float() / 255, labels), batch_size=100)


class FoundBadNets(TriggerEstimator):
    """Stands in for an estimation that found the 3x3 patch toward class 0 (with a picture to write)."""

    def estimate(self, model: nn.Module, unseen: UnseenData, layer: str = "auto",
                 candidates: list[str] | None = None) -> BackdoorEstimate:
        return BackdoorEstimate(0, BadNets(size=3), "neural_cleanse", 0.0, picture=torch.rand(1, 8, 8))


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """Three reports that hold between them nearly every key: (1) trigger known, layer, λ and BatchNorm weight
    chosen on U (``selection``, ``batchnorm_prior``), a forced repair (``repair``, ``diagnostics_after_repair``,
    ``after_edit`` apart from ``after``); (2) trigger unknown with the real, pre-screened estimation
    (``estimation``); (3) trigger unknown with an estimate found and no trigger on the test images
    (``estimated_target``, ``estimated_asr``, the estimated trigger's picture). One thread: these tiny models run
    several times slower on two (conftest.py's ``one_thread``, which a module fixture runs before)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield [json.loads(path.read_text()) for path in write_reports(tmp_path_factory.mktemp("report-docs"))]
    finally:
        torch.set_num_threads(threads)


def write_reports(root: Path) -> list[Path]:
    """The three reports of :func:`reports`, written under ``root``; their paths."""
    data = digits()
    unseen, test = data.unseen_set(), data.test_dataset().tensors
    known = DefenseCallback(defense=ActivationEditing(layer="auto", strength=None, batchnorm_prior=None,
                                                      repair_tolerance=-1))
    known.defend(trained(), digits(), [], root / "known")
    written = [known.report_path]
    estimators = {"estimated": TriggerEstimator(progress=False, prescreen_steps=20, prescreen_min_classes=3),
                  "found": FoundBadNets()}
    for name, estimator in estimators.items():
        callback = DefenseCallback(defense=EstimateFirst(ActivationEditing(layer="fc"), estimator,
                                                         every_candidate=False),
                                   trigger_known=False, unseen_dataloader=pixel_loader(unseen.images, unseen.labels),
                                   test_dataloader=pixel_loader(test[0], test[1]))
        callback.defend(trained(), None, [], root / name)  # no data module: no trigger for the test images
        written.append(callback.report_path)
    return written


def test_the_reports_cover_what_they_are_meant_to(reports: list[dict[str, Any]]) -> None:
    known, estimated, found = reports
    assert known["defense"]["repair"]["forced"] and "diagnostics_after_repair" in known["defense"]
    assert "selection" in known["defense"] and "batchnorm_prior" in known["defense"]
    assert estimated["defense"]["estimation"]["prescreen_steps"] == 20
    assert found["estimated_target"] == 0 and "estimated_asr" in found["after"]
    assert "estimated_trigger" in found["defense"]
    # the page's units: fractions in [0, 1]
    for report in reports:
        for stage in STAGES:
            values = [value for key, value in report[stage].items() if key != "per_class_acc"]
            assert all(0.0 <= value <= 1.0 for value in values + report[stage]["per_class_acc"]), report[stage]
    assert 0.0 <= known["der"] <= 1.0


def test_every_report_key_is_documented(reports: list[dict[str, Any]]) -> None:
    page = PAGE.read_text()
    paths = {path: nested for report in reports for path, nested in key_paths(report).items()}
    # a key is named in backticks; an object also counts as named through its documented keys
    missing = sorted(path for path, nested in paths.items()
                     if f"`{path}`" not in page and not (nested and f"`{path}." in page))
    assert not missing, f"docs/report.md does not name these keys of defense_report.json: {missing}"


def test_the_page_names_no_key_that_is_not_written(reports: list[dict[str, Any]]) -> None:
    """The first column of the page's tables: keys these reports hold, or listed in DOCUMENTED_FROM_CODE (a key
    renamed in the code fails here until the page follows)."""
    paths = {path for report in reports for path in key_paths(report)}
    rows = [line.split(" | ")[0] for line in PAGE.read_text().splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([^`]+)`", row)}
    assert documented, "no key table found in docs/report.md"
    stale = sorted(documented - paths - DOCUMENTED_FROM_CODE)
    assert not stale, f"docs/report.md names keys no report here holds (add them to DOCUMENTED_FROM_CODE if the " \
                      f"code writes them in a case these reports do not reach): {stale}"
    assert DOCUMENTED_FROM_CODE <= documented, sorted(DOCUMENTED_FROM_CODE - documented)
