"""The defense on a GPU gives the CPU's edit: every solve form, layer choice, repair, prior and the estimation,
run on CUDA and on the CPU with the same inputs and seed: skipped without a GPU (CI has none; run where one is:
``benchmarks/gpu_budget/`` on a lent machine). ``LB_TEST_DEVICE`` may name another device to check the harness
itself. Which device the defense runs on under a Trainer is checked on any machine."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from torch import nn

from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, EstimateFirst, UnseenData
from lightning_backdoor.defenses.estimation import TriggerEstimator
from lightning_backdoor.models import build_model
from lightning_backdoor.triggers import Blended

DEVICE = os.environ.get("LB_TEST_DEVICE", "cuda")
needs_device = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(autouse=True)
def float32_kernels():
    """TF32 off (cuDNN's convolutions use it by default): the CPU computes in float32, so must the GPU here."""
    if not torch.cuda.is_available():
        yield
        return
    settings = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = settings


def network(spec: str) -> nn.Module:
    torch.manual_seed(0)
    settings: dict[str, Any] = {"width": 0.125} if spec == "preact_resnet18" else {}
    return build_model(spec, num_classes=10, in_channels=3, **settings).eval()


def unseen(per_class: int) -> UnseenData:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(10).repeat(per_class)
    return UnseenData(torch.rand(len(labels), 3, 32, 32, generator=generator), labels)


def defend(model: nn.Module, defense: Any, data: UnseenData, device: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Defend a copy of ``model`` on ``device``; its state back on the CPU, and the result."""
    model = copy.deepcopy(model).to(device)
    torch.manual_seed(0)
    result = defense.defend(model, UnseenData(data.images.to(device), data.labels.to(device)),
                            BackdoorKnowledge.of(Blended(), 0) if not isinstance(defense, EstimateFirst) else None)
    assert all(parameter.device.type == torch.device(device).type for parameter in model.parameters())
    return {name: value.detach().cpu() for name, value in model.state_dict().items()}, result


def assert_same_edit(model: nn.Module, here: dict[str, torch.Tensor], there: dict[str, torch.Tensor],
                     tolerance: float) -> None:
    """Each changed tensor's change agrees to ``tolerance`` of its size (kernels sum in other orders on a GPU);
    unchanged tensors stay unchanged on both."""
    original = model.state_dict()
    for name, value in original.items():
        change_here, change_there = here[name] - value, there[name] - value
        if not value.is_floating_point() or not change_here.any():
            assert torch.equal(here[name], there[name]), name
            continue
        error = (change_there - change_here).norm() / change_here.norm()
        assert error < tolerance, f"{name}: the edits differ by {float(error):.3g} of the CPU's"


SETTINGS = {
    "moments": ("compact", 15, {"layer": "blocks.2.conv2"}),  # more keys than the width 2,304
    "key-space": ("compact", 1, {"layer": "blocks.2.conv2", "min_images": 0, "repair": False}),
    "rank-r": ("compact", 5, {"layer": "blocks.2.conv2", "method": "rank_r", "rank": 4}),
    "bf16": ("compact", 5, {"layer": "blocks.2.conv2", "bf16": True}),
    "pin-repair-forced": ("compact", 5, {"layer": "blocks.2.conv2", "repair_tolerance": -1.0}),
    "protect-repair-forced": ("compact", 5, {"layer": "blocks.2.conv2", "repair_tolerance": -1.0,
                                             "repair_method": "protect"}),
    "batchnorm-prior-chosen": ("compact", 5, {"layer": "blocks.2.conv2", "batchnorm_prior": None}),
    "auto-and-strength-on-U": ("compact", 5, {"layer": "auto", "strength": None}),
    "residual-correction": ("preact_resnet18", 5, {"layer": "layer4.1.conv2"}),
    "auto-over-blocks": ("preact_resnet18", 5, {"layer": "auto", "candidates": 4}),
    "transformer-tokens": ("vit", 5, {"layer": "auto"}),
}


@needs_device
@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_edit_on_the_device_is_the_cpus(name: str) -> None:
    spec, per_class, settings = SETTINGS[name]
    model, data = network(spec), unseen(per_class)
    here, result_here = defend(model, ActivationEditing(**settings), data, "cpu")
    there, result_there = defend(model, ActivationEditing(**settings), data, DEVICE)
    assert (result_there.layer, result_there.repaired) == (result_here.layer, result_here.repaired)
    assert result_there.details["strength"] == result_here.details["strength"]
    assert result_there.details["system"]["form"] == result_here.details["system"]["form"]
    # bfloat16 products round differently per kernel (on the CPU they move this edit by 10 % from float32's)
    assert_same_edit(model, here, there, 0.25 if settings.get("bf16") else 0.02)
    residual_here, residual_there = (result.details["diagnostics"]["triggered_residual_after"]
                                     for result in (result_here, result_there))
    assert residual_there == pytest.approx(residual_here, rel=0.05)


@needs_device
def test_the_estimation_on_the_device_is_the_cpus() -> None:
    """An untrained net runs every estimator's inversion as a poisoned one does (float32 here: bf16 rounds per
    kernel): the verdict, target and anomaly indices must agree."""
    model, data = network("compact"), unseen(5)
    estimator = TriggerEstimator(max_steps=20, progress=False, bf16=False)
    _, here = defend(model, EstimateFirst(ActivationEditing(layer="blocks.2.conv2"), estimator), data, "cpu")
    _, there = defend(model, EstimateFirst(ActivationEditing(layer="blocks.2.conv2"), estimator), data, DEVICE)
    estimation_here, estimation_there = here.details["estimation"], there.details["estimation"]
    assert estimation_there["backdoor_found"] == estimation_here["backdoor_found"]
    assert estimation_there.get("target_class") == estimation_here.get("target_class")
    # 20 steps of each inversion from the same start, its sums in other orders: the indices drift apart a little
    # (measured on an H200: at most 0.26). Not the warp inversion's: grid_sample's backward pass on CUDA adds its
    # gradients atomically, in no fixed order, and on an untrained net (sizes nearly alike, a tiny median
    # deviation) that moved its indices by up to 2.2; its verdict above still agreed
    gaps = {name: (torch.tensor(estimation_there["anomaly_index"][name]) - torch.tensor(indices)).abs().max().item()
            for name, indices in estimation_here["anomaly_index"].items() if name != "warp"}
    assert max(gaps.values()) < 0.5, gaps


def test_the_defense_runs_on_a_cuda_gpu_or_the_cpu_only() -> None:
    """The Trainer's root device where it is a CUDA GPU or the CPU; on MPS (no float64 there, which the key-space
    solve uses) and any other accelerator, the CPU."""
    from types import SimpleNamespace

    from lightning_backdoor.defenses.callback import defense_device

    def trainer(device: str) -> SimpleNamespace:
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))

    assert defense_device(trainer("cuda:1")) == torch.device("cuda:1")
    assert defense_device(trainer("cpu")) == torch.device("cpu")
    assert defense_device(trainer("mps:0")) == torch.device("cpu")
    assert defense_device(trainer("xla:0")) == torch.device("cpu")
