"""ResNet-18 with a CIFAR stem: torchvision's ResNet-18 with a 3x3 stride-1 first conv and no stem max-pool."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from lightning_backdoor.models.registry import MODELS


@MODELS.register("resnet18")
class ResNet18(ResNet):
    """torchvision ResNet-18 for small images: the 7x7/2 stem and its max-pool would shrink 32x32 inputs to 8x8.

    Takes ``(N, in_channels, H, W)`` floats in [0, 1] and returns logits ``(N, num_classes)``. Parameter names are
    torchvision's (``conv1``, ``layer1.0.conv2``, ``fc``).

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input images.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        # Same initialisation torchvision gives every other conv of the network.
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
