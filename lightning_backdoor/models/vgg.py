"""VGG-16 with batch norm for small images (the CIFAR variant: global pooling and a single linear classifier)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_backdoor.models.registry import MODELS

#: Output channels of each 3x3 conv, with "M" for a 2x2 max-pool: configuration "D" of Simonyan & Zisserman.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


@MODELS.register("vgg16_bn")
class VGG16BN(nn.Module):
    """VGG-16-BN for small images: torchvision's ``features`` layout, global average pool, one ``Linear(512, C)``.

    Takes ``(N, in_channels, H, W)`` floats in [0, 1] with ``H, W >= 16`` and returns logits ``(N, num_classes)``.
    Module names match torchvision's ``vgg16_bn`` (``features.0``, ..., ``avgpool``, ``classifier``); the three-layer
    4096-wide ImageNet classifier is replaced, so its weights do not apply.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input images.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in VGG16_LAYOUT:
            if entry == "M":
                # ceil_mode keeps 28x28 inputs alive through five halvings (28-14-7-4-2-1) and is a no-op for 32x32.
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                assert isinstance(entry, int)
                layers += [nn.Conv2d(channels, entry, kernel_size=3, padding=1), nn.BatchNorm2d(entry), nn.ReLU(True)]
                channels = entry
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG initialisation, so results match a torchvision vgg16_bn with the same head swap.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Map images ``(N, in_channels, H, W)`` in [0, 1] to logits ``(N, num_classes)``."""
        return self.classifier(self.avgpool(self.features(images)).flatten(1))
