"""Defend the foreign ResNet-18 (train_foreign.py) from Python, with no config and no Trainer: the README's
"Defend your own model" example, run for real.

    python benchmarks/foreign_model/defend_in_python.py --run runs/foreign --test ../shared/data/cifar10/test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from lightning_backdoor import DefenseCallback
from lightning_backdoor.data import read_image_folder
from lightning_backdoor.triggers import BadNets
from lightning_backdoor.weights import load_weights

CIFAR10 = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/foreign")
    parser.add_argument("--test", default="../shared/data/cifar10/test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    run = Path(args.run)

    model = torchvision.models.resnet18(num_classes=10)  # the architecture it was trained with
    load_weights(model, torch.load(run / "weights.pt", weights_only=True))  # maps DataParallel's "module." prefix
    unseen = read_image_folder(run / "unseen")  # the defender's own clean images: <class>/<image files>
    test = read_image_folder(args.test, classes=unseen.classes)
    callback = DefenseCallback(
        trigger=BadNets(size=3), target_class=0,  # known here; trigger_known=False estimates both
        normalize=CIFAR10,  # the model's preprocessing: images and triggers stay pixels in [0, 1]
        unseen_dataloader=DataLoader(TensorDataset(unseen.images, unseen.labels), batch_size=500),
        test_dataloader=DataLoader(TensorDataset(test.images, test.labels), batch_size=500))
    report = callback.defend(model, None, [], Path(args.out or run / "defended-python"))
    metrics = ("clean_acc", "asr", "asr_floor", "target_acc")
    print({stage: {name: round(report.stages[stage][name], 4) for name in metrics} for stage in ("before", "after")})


if __name__ == "__main__":
    main()
