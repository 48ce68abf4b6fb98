"""Image classifiers by name: ``build_model("compact", num_classes=10, in_channels=1)`` or ``torchvision:<name>``."""

# Importing each architecture module registers it in MODELS.
from lightning_backdoor.models.compact import CompactBlock, CompactNet
from lightning_backdoor.models.preact_resnet import PreActBlock, PreActResNet18
from lightning_backdoor.models.registry import MODELS, build_model, register_model, replace_first_conv
from lightning_backdoor.models.resnet import ResNet18
from lightning_backdoor.models.vgg import VGG16BN

__all__ = [
    "MODELS",
    "VGG16BN",
    "CompactBlock",
    "CompactNet",
    "PreActBlock",
    "PreActResNet18",
    "ResNet18",
    "build_model",
    "register_model",
    "replace_first_conv",
]
