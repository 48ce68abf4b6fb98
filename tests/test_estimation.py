"""Defending without backdoor knowledge: the anomaly index, target estimation on a backdoored model, a clean model
left unchanged, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_backdoor.cli import instantiate_run, main
from lightning_backdoor.defenses import ActivationEditing, UnseenData
from lightning_backdoor.defenses.callback import DefenseCallback
from lightning_backdoor.defenses.estimation import TriggerEstimator, anomaly_index
from lightning_backdoor.io import load_state_dict

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_anomaly_index_matches_hand_computation() -> None:
    # median of [1, 10, 11, 12, 13, 14] is 11.5; |x - 11.5| = [10.5, 1.5, .5, .5, 1.5, 2.5], median 1.5
    index = anomaly_index(torch.tensor([1.0, 10.0, 11.0, 12.0, 13.0, 14.0]))
    mad = 1.4826 * 1.5
    expected = [10.5 / mad, 1.5 / mad, 0.5 / mad, -0.5 / mad, -1.5 / mad, -2.5 / mad]
    assert index.tolist() == pytest.approx(expected)
    assert index[0] == pytest.approx(4.72141, abs=1e-4)  # the one outlier: index > 2 on the small side


def test_anomaly_index_with_zero_deviation() -> None:
    index = anomaly_index(torch.tensor([5.0, 5.0, 5.0, 1.0, 9.0]))
    assert index.tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf]


def test_estimation_finds_the_target_and_removes_the_backdoor(quickstart_run: Path, tmp_path: Path) -> None:
    module, data = instantiate_run([QUICKSTART], quickstart_run / "checkpoints" / "poisoned.ckpt")
    callback = DefenseCallback(trigger_known=False)
    report = callback.defend(module, data, [], tmp_path)
    estimation = report["defense"]["estimation"]
    assert estimation["backdoor_found"] and estimation["target_class"] == data.target_class == 0
    indices = estimation["anomaly_index"][estimation["estimator"]]
    assert len(indices) == data.num_classes and max(indices) == indices[0] > 2
    assert report["after"]["asr"] < 0.2 < 0.9 < report["before"]["asr"]
    assert report["after"]["clean_acc"] > report["before"]["clean_acc"] - 0.02
    written = json.loads(callback.report_path.read_text())
    assert Path(written["defense"]["estimated_trigger"]).is_file()
    assert {"estimation_seconds", "editing_seconds"} <= set(written["defense"])


@pytest.mark.xfail(strict=True, reason="known false alarm (README, trigger unknown): on the clean quickstart model "
                   "class 8 gets anomaly index 3.01 (perturbation) and 2.29 (Neural Cleanse), so it is edited")
def test_clean_model_is_left_unchanged(clean_quickstart_run: Path, tmp_path: Path) -> None:
    checkpoint = clean_quickstart_run / "checkpoints" / "poisoned.ckpt"
    main(["defend", "--config", QUICKSTART, "--checkpoint", str(checkpoint), "--trigger_known", "false",
          "--output_dir", str(tmp_path), "--trainer.logger=false"])
    report = json.loads((tmp_path / "defense_report.json").read_text())
    assert report["defense"]["estimation"]["backdoor_found"] is False
    assert report["defense"]["method"] == "editing/no_backdoor_found"
    original, defended = load_state_dict(checkpoint), load_file(tmp_path / "defended.safetensors")
    weights = [key for key in original if key.startswith("net.")]
    assert weights and all(torch.equal(defended[key], original[key]) for key in weights)
    assert report["after"]["clean_acc"] == report["before"]["clean_acc"]


def test_a_model_with_one_output_class_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1))
    unseen = UnseenData(torch.rand(10, 1, 28, 28), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 3 output classes .*; this model has 1$"):
        ActivationEditing().defend(model, unseen, None, None)


def test_too_few_unseen_images_per_class_are_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    labels = torch.arange(10).repeat(2)
    with pytest.raises(ValueError, match="at least 5 unseen images of every class; class 0 has 2"):
        TriggerEstimator().estimate(model, UnseenData(torch.rand(20, 1, 28, 28), labels))
