"""PreAct-ResNet18, the reference model of the backdoor literature, in BackdoorBench's layout and parameter names."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_backdoor.models.registry import MODELS


class PreActBlock(nn.Module):
    """A pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a skip term.

    Input ``(N, in_planes, H, W)``, output ``(N, planes, H // stride, W // stride)``.
    """

    #: The child whose output plus a skip term is exactly this block's output (nothing runs after the addition).
    #: Model-editing defenses rely on it to split the block into its residual branch and its shortcut.
    residual_branch: ClassVar[str] = "conv2"

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            # BackdoorBench names this projection ``shortcut.0``; keeping the name lets its checkpoints load.
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))
        else:
            self.shortcut = nn.Identity()

    @property
    def projects(self) -> bool:
        """Whether the skip term is a 1x1 projection of the pre-activated input rather than the raw input."""
        return not isinstance(self.shortcut, nn.Identity)

    def skip(self, x: Tensor) -> Tensor:
        """The skip term alone for input ``x`` ``(N, in_planes, H, W)``: ``block(x) - block.conv2(...)``."""
        return self.shortcut(F.relu(self.bn1(x))) if self.projects else x

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, in_planes, H, W)`` to ``(N, planes, H // stride, W // stride)``."""
        pre = F.relu(self.bn1(x))
        # The identity skip takes the raw input and the projection takes the pre-activated one (He et al., 2016).
        skip = self.shortcut(pre) if self.projects else x
        hidden = self.conv1(pre)
        # Must stay the last operation: ``residual_branch`` promises output == conv2 output + skip.
        return self.conv2(F.relu(self.bn2(hidden))) + skip


@MODELS.register("preact_resnet18")
class PreActResNet18(nn.Module):
    """PreAct-ResNet18 for small images: 3x3 stem, four stages of two :class:`PreActBlock`, BN-ReLU, avg-pool, linear.

    Takes ``(N, in_channels, H, W)`` floats in [0, 1] (32x32 CIFAR, 28x28 MNIST, larger also works) and returns
    logits ``(N, num_classes)``. Parameter names follow BackdoorBench (``conv1``, ``layer1.0.conv2``, ``bn``,
    ``linear``), so its checkpoints load with ``width=1.0``.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input images.
        width: multiplier on the channel widths 64/128/256/512 (and the stem); 0.5 gives a quarter of the compute.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.num_classes = num_classes
        stage_widths = [max(1, round(base * width)) for base in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, stage_widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = stage_widths[0]
        stages: list[nn.Sequential] = []
        for planes, stride in zip(stage_widths, (1, 2, 2, 2)):
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # Pre-activation blocks end on a bare addition, so the final BN-ReLU normalises the features for the head.
        self.bn = nn.BatchNorm2d(in_planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Map images ``(N, in_channels, H, W)`` in [0, 1] to logits ``(N, num_classes)``."""
        out = self.conv1(images)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(self.avgpool(out).flatten(1))
