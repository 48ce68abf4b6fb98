"""The residual correction found by tracing against the one recognised by class, on a foreign ResNet-18.

Loads the weights of ``train_foreign.py`` (torchvision ResNet-18, CIFAR-10 normalisation), defends it with the trigger
known (``layer: auto``, the defender's own images) once as it is (torchvision's ``BasicBlock``, recognised by class)
and once with every block put under a subclass the edit does not know (found from its traced forward), and prints
the chosen layer, the cross-validated scores and the largest difference between the defended weights.

    python benchmarks/foreign_model/traced_blocks.py --run runs/foreign
"""

from __future__ import annotations

import argparse
import copy

import torch
import torchvision
from torch import nn

from lightning_backdoor.data.folders import read_image_folder
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.residual import residual_branch_of
from lightning_backdoor.triggers import BadNets
from lightning_backdoor.weights import load_weights

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class UnknownBlock(torchvision.models.resnet.BasicBlock):
    """torchvision's block under another class: not recognised by class, only by its traced forward."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/foreign", help="train_foreign.py's output (weights.pt, unseen/)")
    args = parser.parse_args()
    net = torchvision.models.resnet18(num_classes=10)
    load_weights(net, torch.load(f"{args.run}/weights.pt", weights_only=True))
    models = {"by class": nn.Sequential(Normalize(), net).eval()}
    models["traced"] = copy.deepcopy(models["by class"])
    for module in models["traced"].modules():
        if type(module) is torchvision.models.resnet.BasicBlock:
            module.__class__ = UnknownBlock
    folder = read_image_folder(f"{args.run}/unseen")
    unseen = UnseenData(folder.images.float() / 255, folder.labels)
    knowledge = BackdoorKnowledge.of(BadNets(size=3, position="bottom_right"), 0)
    for name, model in models.items():
        print(f"{name}: layer3.0.conv2's block {residual_branch_of(model, '1.layer3.0.conv2')}")
        result = ActivationEditing(layer="auto").defend(model, unseen, knowledge)
        scores = result.details["selection"]["cross_validated_loss_on_unseen"]
        print(f"{name}: edited {result.layer}, scores {scores}")
    weights = [dict(model.named_parameters()) for model in models.values()]
    print("largest difference of the defended weights:",
          max((weights[0][key] - weights[1][key]).abs().max().item() for key in weights[0]))


if __name__ == "__main__":
    main()
