"""Tests of the model registry and the built-in architectures (CPU, tiny batches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_backdoor.models import (
    MODELS,
    VGG16BN,
    CompactNet,
    PreActBlock,
    PreActResNet18,
    ResNet18,
    build_model,
    replace_first_conv,
)

BUILT_IN = ("compact", "preact_resnet18", "resnet18", "vgg16_bn")
IMAGE_SHAPES = ((1, 28, 28), (3, 32, 32))  # MNIST, CIFAR


def test_built_in_models_are_registered() -> None:
    assert set(BUILT_IN) <= set(MODELS)


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("name", [*BUILT_IN, "torchvision:resnet18"])
def test_model_returns_logits_of_right_shape(name: str, image_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=image_shape[0]).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, *image_shape))
    assert logits.shape == (2, 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError) as excinfo:
        build_model("foo", num_classes=10)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("unknown model 'foo'; known models: ")
    for name in BUILT_IN:
        assert name in message
    assert "torchvision:<name>" in message


def test_invalid_torchvision_name_raises_one_line_error() -> None:
    with pytest.raises(ValueError, match="unknown torchvision model 'no_such_net'") as excinfo:
        build_model("torchvision:no_such_net", num_classes=10)
    assert "\n" not in str(excinfo.value)


def test_a_torchvision_stem_stride_keeps_every_weight_and_halves_no_resolution() -> None:
    """``stem_stride: 1`` (a CIFAR port of MobileNetV3): the same parameters as torchvision's model, so weights trained
    with the adapted stem load into it, and the feature map before the pool is twice as large on each side."""
    reference = build_model("torchvision:mobilenet_v3_small", num_classes=10)
    adapted = build_model("torchvision:mobilenet_v3_small", num_classes=10, stem_stride=1)
    assert adapted.features[0][0].stride == (1, 1) and reference.features[0][0].stride == (2, 2)
    shapes = [{key: value.shape for key, value in model.state_dict().items()} for model in (adapted, reference)]
    assert shapes[0] == shapes[1]
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert adapted.features(images).shape[-2:] == (2, 2) and reference.features(images).shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match="stem_stride must be at least 1"):
        build_model("torchvision:mobilenet_v3_small", num_classes=10, stem_stride=0)


def test_torchvision_detection_model_is_rejected() -> None:
    # Detection builders exist in torchvision but do not return (N, num_classes) logits.
    with pytest.raises(ValueError):
        build_model("torchvision:fasterrcnn_resnet50_fpn", num_classes=10)


@pytest.mark.parametrize("num_classes", [0, 1])
def test_fewer_than_two_classes_raises(num_classes: int) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("compact", num_classes=num_classes)


def test_a_registered_builder_receives_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS))  # the registration is undone after the test

    @MODELS.register("tiny_linear")
    def tiny_linear(num_classes: int, in_channels: int, hidden: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.Linear(hidden, num_classes))

    assert MODELS["tiny_linear"] is tiny_linear
    model = build_model("tiny_linear", num_classes=3, in_channels=1, hidden=7)
    assert model[2].in_features == 7


@pytest.mark.parametrize("name", ["torchvision:mine", "timm:mine", "my.net"])
def test_a_model_name_of_another_form_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="reserved prefix|marks a class path"):
        MODELS.register(name)
    assert name not in MODELS


def test_an_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnt18' \(did you mean 'resnet18'"):
        build_model("resnt18", num_classes=10)


def test_torchvision_model_gets_first_conv_adapted_to_in_channels() -> None:
    model = build_model("torchvision:resnet18", num_classes=5, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model.conv1.out_channels == 64
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.fc.out_features == 5


def test_replace_first_conv_takes_the_earliest_conv_in_module_order() -> None:
    # The nested conv runs first; a search of direct children before grandchildren would pick the wrong one.
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Conv2d(4, 4, 3))
    replace_first_conv(model, in_channels=1)
    assert model[0][0].in_channels == 1
    assert model[1].in_channels == 4
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 4, 4, 4)


@pytest.mark.parametrize(("in_planes", "planes", "stride"), [(8, 8, 1), (8, 16, 2)], ids=["identity", "projection"])
def test_preact_block_output_is_conv2_output_plus_shortcut(in_planes: int, planes: int, stride: int) -> None:
    torch.manual_seed(0)
    block = PreActBlock(in_planes, planes, stride)
    # Non-trivial norm statistics, so that a skip computed from the wrong tensor would not match by accident.
    for norm in (block.bn1, block.bn2):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    block.eval()

    branch_name = PreActBlock.residual_branch
    assert branch_name in dict(block.named_children())
    branch = getattr(block, branch_name)
    captured: list[torch.Tensor] = []
    handle = branch.register_forward_hook(lambda module, inputs, output: captured.append(output))
    x = torch.randn(2, in_planes, 8, 8)
    with torch.no_grad():
        output = block(x)
        if stride == 1 and in_planes == planes:
            expected_skip = x
        else:
            expected_skip = block.shortcut[0](F.relu(block.bn1(x)))
    handle.remove()

    assert len(captured) == 1
    assert output.shape == (2, planes, 8 // stride, 8 // stride)
    torch.testing.assert_close(output - captured[0], expected_skip)
    torch.testing.assert_close(block.skip(x), expected_skip)


def test_preact_resnet18_has_backdoorbench_names_and_width_multiplier() -> None:
    model = PreActResNet18(num_classes=10)
    keys = set(model.state_dict())
    for key in ("conv1.weight", "layer1.0.conv2.weight", "layer2.0.shortcut.0.weight", "bn.weight", "linear.bias"):
        assert key in keys
    assert "layer1.0.shortcut.0.weight" not in keys  # identity skip in the first stage
    assert sum(isinstance(m, PreActBlock) for m in model.modules()) == 8
    narrow = PreActResNet18(num_classes=10, width=0.5)
    assert narrow.conv1.out_channels == 32
    assert narrow.linear.in_features == 256


def test_compact_net_has_readable_layer_names() -> None:
    model = CompactNet(num_classes=10, in_channels=1)
    modules = dict(model.named_modules())
    assert isinstance(modules["blocks.2.conv2"], nn.Conv2d)
    assert modules["blocks.2.conv2"].out_channels == 256
    assert isinstance(modules["head"], nn.Linear)
    assert modules["head"].bias is None
    assert modules["head"].out_features == 10


def test_compact_net_widths_argument_sets_block_widths() -> None:
    model = CompactNet(num_classes=4, widths=(8, 16, 32))
    assert [block.conv2.out_channels for block in model.blocks] == [8, 16, 32]
    assert model.head.in_features == 32
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_resnet18_has_cifar_stem() -> None:
    model = ResNet18(num_classes=10, in_channels=1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)


def test_vgg16_bn_matches_torchvision_features_and_has_small_head() -> None:
    model = VGG16BN(num_classes=10)
    reference = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    ours = {k: v.shape for k, v in model.features.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert ours == theirs
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 10)


def test_a_timm_stem_stride_keeps_every_weight() -> None:
    """``stem_stride: 1`` on a timm ResNet-18 (the usual CIFAR version keeps its max-pool): the same parameter names
    and shapes as timm's model, so its weights load, and twice the resolution after the stem."""
    default = build_model("timm:resnet18", num_classes=10).eval()
    adapted = build_model("timm:resnet18", num_classes=10, stem_stride=1).eval()
    assert adapted.conv1.stride == (1, 1) and default.conv1.stride == (2, 2)
    assert {k: v.shape for k, v in adapted.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    images = torch.rand(1, 3, 32, 32)
    assert adapted.forward_features(images).shape[-1] == 2 * default.forward_features(images).shape[-1]
