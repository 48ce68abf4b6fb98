"""Image classifiers by name: ``build_model("compact", num_classes=10, in_channels=1)``, ``torchvision:<name>``,
``timm:<name>`` or an ``nn.Module`` class path; and the input transform (normalisation, resize) a network was
trained with."""

# Importing each architecture module registers it in MODELS.
from lightning_backdoor.models.compact import CompactBlock, CompactNet
from lightning_backdoor.models.input_transform import InputTransform, input_transform_of
from lightning_backdoor.models.preact_resnet import PreActBlock, PreActResNet18
from lightning_backdoor.models.registry import MODELS, build_model, replace_first_conv
from lightning_backdoor.models.resnet import ResNet18
from lightning_backdoor.models.vgg import VGG16BN
from lightning_backdoor.models.vit import vit

__all__ = [
    "MODELS",
    "VGG16BN",
    "CompactBlock",
    "CompactNet",
    "InputTransform",
    "PreActBlock",
    "PreActResNet18",
    "ResNet18",
    "build_model",
    "input_transform_of",
    "replace_first_conv",
    "vit",
]
