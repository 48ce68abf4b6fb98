"""Residual blocks with a norm between the edited layer and the addition: torchvision's inverted-residual and ResNet
blocks are recognised (their project conv's BatchNorm is an affine map per channel in eval mode), the skip term is captured in
the layer's output units, and the corrected edit cancels the trigger at the block's output where the uncorrected
one cannot; ``layer: auto`` reaches those project convs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from skip_correction import skip_correction_gaps
from torch import Tensor, nn

from lightning_backdoor.defenses import ActivationEditing
from lightning_backdoor.defenses.activations import auto_candidates, capture, check_residual_sums
from lightning_backdoor.defenses.residual import ResidualBranch, bypassed, channel_scale, residual_branch_of
from lightning_backdoor.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def randomised_norms(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every BatchNorm's statistics and affine weights drawn at random (seed 0), so that
    a norm's scale is far from 1 and a test cannot pass by ignoring it."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator))
                module.running_var.copy_(torch.rand(size, generator=generator) * 2 + 0.3)
                module.weight.copy_(torch.rand(size, generator=generator) * 2 + 0.3)
                module.bias.copy_(torch.randn(size, generator=generator))
    return model.eval()


def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    model.features[0][0].stride = (1, 1)  # a CIFAR stem: 2x2 maps at the end for 32x32 images
    return randomised_norms(model)


def test_torchvision_inverted_residual_blocks_declare_their_project_conv_and_its_norm() -> None:
    model = mobilenet()
    assert residual_branch_of(model, "features.11.block.3.0") == ResidualBranch("features.11", "features.11.block.3.1")
    assert residual_branch_of(model, "features.3.block.2.0") == ResidualBranch("features.3", "features.3.block.2.1")
    assert residual_branch_of(model, "features.4.block.3.0") is None  # stride 2: no residual connection
    assert residual_branch_of(model, "features.11.block.0.0") is None  # the expand conv: an activation follows
    assert residual_branch_of(model, "features.11.block.2.fc2") is None  # squeeze-excitation: a gate, not a sum
    assert residual_branch_of(model, "classifier.0") is None
    v2 = torchvision.models.mobilenet_v2(num_classes=10)
    assert residual_branch_of(v2, "features.3.conv.2") == ResidualBranch("features.3", "features.3.conv.3")
    efficientnet = torchvision.models.efficientnet_b0(num_classes=10)
    assert residual_branch_of(efficientnet, "features.2.1.block.3.0") == ResidualBranch(
        "features.2.1", "features.2.1.block.3.1")


def test_torchvision_resnet_blocks_declare_their_last_conv_and_read_the_skip_where_it_comes_from() -> None:
    """torchvision's BasicBlock and Bottleneck output relu(bn(conv(·)) + shortcut): the last conv is the branch,
    its BatchNorm the scale, and the skip term is read at the block's input or its downsample path's output."""
    resnet18 = torchvision.models.resnet18(num_classes=10)
    assert residual_branch_of(resnet18, "layer4.1.conv2") == ResidualBranch("layer4.1", "layer4.1.bn2", True, None)
    assert residual_branch_of(resnet18, "layer4.0.conv2") == ResidualBranch("layer4.0", "layer4.0.bn2", True,
                                                                             "layer4.0.downsample")
    assert residual_branch_of(resnet18, "layer4.0.conv1") is None and bypassed(resnet18, "layer4.0.conv1")
    assert bypassed(resnet18, "layer4.0.downsample.0") and not bypassed(resnet18, "layer4.0.conv2")
    resnet50 = torchvision.models.resnet50(num_classes=10)
    assert residual_branch_of(resnet50, "layer1.1.conv3") == ResidualBranch("layer1.1", "layer1.1.bn3", True, None)
    assert residual_branch_of(resnet50, "layer1.1.conv2") is None
    # timm's blocks alike, except with squeeze-excitation between the norm and the add (a gate, not a sum)
    assert residual_branch_of(timm.create_model("resnet50d", num_classes=10), "layer2.0.conv3") == ResidualBranch(
        "layer2.0", "layer2.0.bn3", True, "layer2.0.downsample")
    assert residual_branch_of(timm.create_model("seresnet18", num_classes=10), "layer2.1.conv2") is None


@pytest.mark.parametrize("block", ["layer4.0", "layer4.1"])
def test_the_skip_term_of_a_torchvision_resnet_block_is_its_shortcut_in_the_layer_output_units(block: str) -> None:
    """The captured skip of a block's conv2 is its shortcut (the input, or downsample(input) in layer4.0) divided
    by bn2's scale, per channel: not the block's output minus the branch's, which the ReLU after the sum distorts."""
    model = randomised_norms(torchvision.models.resnet18(num_classes=10))
    module = model.get_submodule(block)
    inputs = []
    handle = module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    acts = capture(model, [f"{block}.conv2"], torch.rand(2, 3, 64, 64))[f"{block}.conv2"]
    handle.remove()
    with torch.no_grad():
        shortcut = inputs[0] if module.downsample is None else module.downsample(inputs[0])
    expected = (shortcut / channel_scale(module.bn2).view(-1, 1, 1)).flatten(2).transpose(1, 2)
    assert acts.skip.shape == acts.values.shape == expected.shape
    assert torch.allclose(acts.skip, expected, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize(("library", "block"), [("torchvision", "layer4.0"), ("torchvision", "layer4.1"),
                                                 ("timm", "layer4.0")])
def test_the_corrected_edit_cancels_the_trigger_at_a_resnet_block_output(library: str, block: str) -> None:
    """A torchvision or timm ResNet-18 block alone (with and without its downsample path), a trigger added to one
    position of its input: the corrected edit of conv2 maps the triggered sum onto the clean one, so the output after
    the ReLU is the clean output; the uncorrected edit leaves the trigger that the shortcut carries."""
    torch.manual_seed(0)
    resnet = (torchvision.models.resnet18(num_classes=10) if library == "torchvision"
              else timm.create_model("resnet18", num_classes=10))
    model = nn.Sequential(randomised_norms(resnet).get_submodule(block)).eval()
    assert residual_branch_of(model, "0.conv2") is not None
    channels = model[0].conv1.in_channels
    generator = torch.Generator().manual_seed(1)
    clean_inputs = torch.randn(1, channels, 4, 4, generator=generator).relu()
    triggered_inputs = clean_inputs.clone()
    triggered_inputs[..., 2, 2] += 3 * torch.rand(channels, generator=generator)  # a position the stride-2 1x1
    # downsample conv of layer4.0 reads
    before, results = skip_correction_gaps(model, "0.conv2", "0", clean_inputs, triggered_inputs)
    assert results[True] < 0.05 * before
    assert results[False] > 0.3 * before


def test_a_block_can_declare_the_norm_between_its_branch_and_the_addition() -> None:
    class Block(nn.Module):
        residual_branch, residual_norm = "conv", "norm"

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.norm(self.conv(x))

    model = nn.Sequential(nn.Conv2d(1, 4, 3), Block())
    assert residual_branch_of(model, "1.conv") == ResidualBranch("1", "1.norm")


def test_the_skip_term_is_captured_in_the_layer_output_units() -> None:
    """Block output = norm(conv(·)) + x with norm(v) = s·v + b per channel: the captured skip is x / s, so that
    s·(value + bias) + norm offset + s·skip is the block's output."""
    model, layer, block = mobilenet(), "features.11.block.3.0", "features.11"
    images = torch.rand(3, 3, 32, 32)
    inputs = []
    handle = model.get_submodule(block).register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    acts = capture(model, [layer], images)[layer]
    handle.remove()
    scale = channel_scale(model.get_submodule("features.11.block.3.1"))
    assert acts.skip.shape == acts.values.shape == (3, 4, 96)
    expected = (inputs[0] / scale.view(-1, 1, 1)).flatten(2).transpose(1, 2)
    assert torch.allclose(acts.skip, expected, atol=1e-4 * expected.abs().max().item())


def test_a_norm_channel_scaled_to_zero_gets_no_correction() -> None:
    """A channel the norm multiplies by 0 does not depend on the layer: no edit can move it, so its term is 0."""
    model = mobilenet()
    norm = model.get_submodule("features.11.block.3.1")
    with torch.no_grad():
        norm.weight[5] = 0.0
    acts = capture(model, ["features.11.block.3.0"], torch.rand(2, 3, 32, 32))["features.11.block.3.0"]
    assert torch.isfinite(acts.skip).all() and acts.skip[..., 5].abs().max() == 0


def test_the_corrected_edit_cancels_the_trigger_at_the_block_output_through_the_norm() -> None:
    """Mapping the project conv's triggered keys to their clean values alone leaves the trigger on the skip path;
    the correction (target = clean value + (clean skip − triggered skip), in the conv's units) cancels it at the
    block's output. The last MobileNetV3 block alone, a trigger added to one position of its 2x2 input; one image:
    4 keys in the conv's 576 input dimensions, so an exact edit exists."""
    model = nn.Sequential(mobilenet().features[11]).eval()
    layer, block = "0.block.3.0", "0"
    generator = torch.Generator().manual_seed(1)
    clean_inputs = torch.randn(1, 96, 2, 2, generator=generator)
    triggered_inputs = clean_inputs.clone()
    triggered_inputs[..., -1, -1] += 3 * torch.randn(96, generator=generator)
    before, results = skip_correction_gaps(model, layer, block, clean_inputs, triggered_inputs)
    assert results[True] < 0.05 * before
    assert results[False] > 0.3 * before


def test_layers_inside_a_residual_block_other_than_its_branch_are_bypassed() -> None:
    model = mobilenet()
    assert bypassed(model, "features.11.block.0.0") and bypassed(model, "features.11.block.2.fc1")
    assert not bypassed(model, "features.11.block.3.0")  # the branch: corrected for the skip path
    assert not bypassed(model, "features.9.block.0.0")  # stride 2: no skip path around it
    assert not bypassed(model, "features.12.0") and not bypassed(model, "classifier.3")


def test_auto_reaches_behind_pooled_layers_to_the_last_spatial_layers_no_skip_bypasses() -> None:
    """MobileNetV3-Small on 32x32 images: the last three editable layers are the 1x1 conv on the 2x2 map and the
    two-layer head on pooled features; with a probe image, auto also tries the last three spatial layers no skip
    path bypasses: the last blocks' project convs (corrected) and that 1x1 conv; never an expand conv or a
    squeeze-excitation layer."""
    model = mobilenet()
    assert auto_candidates(model, 3) == ["features.12.0", "classifier.0", "classifier.3"]
    assert auto_candidates(model, 3, torch.rand(1, 3, 32, 32)) == [
        "features.10.block.3.0", "features.11.block.3.0", "features.12.0", "classifier.0", "classifier.3"]
    # where the last layers all read spatial keys, the probe adds nothing
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
    assert auto_candidates(plain, 3, torch.rand(1, 1, 12, 12)) == auto_candidates(plain, 3) == ["2", "3", "4"]
    # behind a one-layer head (the compact CNN: two spatial layers and the head), the probe adds nothing either
    compact = build_model("compact", num_classes=10, in_channels=1, widths=[8, 8, 8]).eval()
    assert auto_candidates(compact, 3, torch.rand(1, 1, 28, 28)) == ["blocks.2.conv1", "blocks.2.conv2", "head"]


def test_a_declared_norm_that_is_no_per_channel_scale_is_refused_before_any_work() -> None:
    """A block declaring a LayerNorm as its ``residual_norm`` (not an affine map per channel): the edit cannot read
    the skip term through it, so the setup check refuses the layer in one line, before any capture."""

    class Block(nn.Module):
        residual_branch, residual_norm = "fc", "norm"

        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, tokens: Tensor) -> Tensor:
            return tokens + self.norm(self.fc(tokens))

    model = nn.Sequential(nn.Linear(8, 8), Block())
    with pytest.raises(ValueError, match=r"^torch\.nn\.modules\.normalization\.LayerNorm between a residual branch "
                                         r"and its add is no per-channel scale the edit knows"):
        ActivationEditing(layer="1.fc").check_model(model, torch.rand(2, 4, 8))


class CifarBlock(nn.Module):
    """The basic block of the CIFAR ResNets common in backdoor research code: ``relu(bn2(conv2(·)) + shortcut(x))``,
    ``shortcut`` an empty ``nn.Sequential`` (the identity) or a strided 1x1 conv and its BatchNorm. Declared as a user
    would for a class they hold: the branch, its norm and where the skip term comes from."""

    residual_branch, residual_norm, residual_shortcut = "conv2", "bn2", "shortcut"

    def __init__(self, channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return torch.relu(out)


class DoubledShortcut(CifarBlock):
    """Declared as :class:`CifarBlock`, but its forward adds twice the shortcut: the declaration is wrong."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + 2 * self.shortcut(x))


class Undeclared(CifarBlock):
    """:class:`CifarBlock` as the CIFAR ResNets of backdoor code have it: nothing declared."""

    residual_branch = residual_norm = residual_shortcut = None


@pytest.mark.parametrize("stride", [1, 2])
def test_a_block_that_applies_relu_to_its_sum_can_declare_where_its_skip_comes_from(stride: int) -> None:
    """A CIFAR ResNet block of the user's own class declaring ``residual_shortcut``: recognised with its skip read
    at the shortcut's output, checked against its forward, and the corrected edit cancels the trigger at its output
    where the uncorrected one cannot."""
    model = randomised_norms(nn.Sequential(CifarBlock(8, 8 * stride, stride)))
    shortcut = "0.shortcut"
    assert residual_branch_of(model, "0.conv2") == ResidualBranch("0", "0.bn2", True, shortcut)
    assert bypassed(model, "0.conv1")
    generator = torch.Generator().manual_seed(1)
    clean_inputs = torch.randn(1, 8, 4, 4, generator=generator).relu()
    triggered_inputs = clean_inputs.clone()
    triggered_inputs[..., 2, 2] += 3 * torch.rand(8, generator=generator)
    check_residual_sums(model, ["0.conv2"], clean_inputs)
    before, results = skip_correction_gaps(model, "0.conv2", "0", clean_inputs, triggered_inputs)
    assert results[True] < 0.05 * before
    assert results[False] > 0.3 * before


def test_a_residual_declaration_that_does_not_describe_the_forward_is_refused_before_any_work() -> None:
    """A block whose forward adds twice its shortcut, or names no shortcut module, is refused in one line by the
    setup check: the correction would target the wrong sums."""
    wrong = randomised_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DoubledShortcut(8, 8)))
    with pytest.raises(ValueError, match=r"^layer 1\.conv2: its block '1' does not output an activation of the "
                                         r"branch's output plus its skip term"):
        ActivationEditing(layer="1.conv2").check_model(wrong, torch.rand(2, 3, 8, 8))
    ActivationEditing(layer="1.conv1").check_model(wrong, torch.rand(2, 3, 8, 8))  # not the branch: nothing to check
    missing = randomised_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CifarBlock(8, 8)))
    missing[1].residual_shortcut = "skip"
    with pytest.raises(ValueError, match=r"declares residual_shortcut='skip', which is no submodule of it"):
        ActivationEditing(layer="1.conv2").check_model(missing, torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize("stride", [1, 2])
def test_a_residual_block_of_an_unknown_class_is_found_from_its_traced_forward(stride: int) -> None:
    """The same block with nothing declared: its traced forward shows relu(bn2(conv2(·)) + shortcut(x)), so it is
    recognised as the declared one is (the skip read at the shortcut's last module, or the block's input where the
    shortcut is an empty ``nn.Sequential``), and the corrected edit cancels the trigger at its output."""
    model = randomised_norms(nn.Sequential(Undeclared(8, 8 * stride, stride)))
    shortcut = "0.shortcut.1" if stride == 2 else None
    assert residual_branch_of(model, "0.conv2") == ResidualBranch("0", "0.bn2", True, shortcut)
    assert bypassed(model, "0.conv1") and residual_branch_of(model, "0.conv1") is None
    generator = torch.Generator().manual_seed(1)
    clean_inputs = torch.randn(1, 8, 4, 4, generator=generator).relu()
    triggered_inputs = clean_inputs.clone()
    triggered_inputs[..., 2, 2] += 3 * torch.rand(8, generator=generator)
    before, results = skip_correction_gaps(model, "0.conv2", "0", clean_inputs, triggered_inputs)
    assert results[True] < 0.05 * before
    assert results[False] > 0.3 * before


def test_a_torchvision_block_of_another_class_is_traced_to_the_same_branch_and_skip() -> None:
    """A subclass of torchvision's BasicBlock (not recognised by class) is found by tracing: the same branch and
    norm, and the same captured skip term as the class recognition gives."""

    class Subclass(torchvision.models.resnet.BasicBlock):
        pass

    known = randomised_norms(torchvision.models.resnet18(num_classes=10))
    traced = copy.deepcopy(known)
    for module in traced.modules():
        if type(module) is torchvision.models.resnet.BasicBlock:
            module.__class__ = Subclass
    images = torch.rand(2, 3, 64, 64)
    for block in ("layer3.0", "layer3.1"):
        by_class, by_trace = residual_branch_of(known, f"{block}.conv2"), residual_branch_of(traced, f"{block}.conv2")
        assert (by_class.block, by_class.scale, by_class.activated) == (by_trace.block, by_trace.scale, True)
        assert by_trace.shortcut == (f"{block}.downsample.1" if block == "layer3.0" else None)
        expected = capture(known, [f"{block}.conv2"], images)[f"{block}.conv2"].skip
        assert torch.equal(capture(traced, [f"{block}.conv2"], images)[f"{block}.conv2"].skip, expected)


class NotASum(nn.Module):
    """Blocks the trace must not take for a residual branch: a scaled branch, a branch module called twice."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.conv, self.bn = kind, nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "scaled":
            return x + 0.5 * self.bn(self.conv(x))
        return self.bn(self.conv(self.conv(x))) + x  # the conv runs twice: no single branch to hook


@pytest.mark.parametrize("kind", ["scaled", "twice"])
def test_a_block_whose_trace_is_no_plain_residual_sum_is_not_recognised(kind: str) -> None:
    model = nn.Sequential(NotASum(kind)).eval()
    assert residual_branch_of(model, "0.conv") is None and not bypassed(model, "0.conv")
