"""The model spec: the input transform (normalisation, resize) every caller of the network gets, any architecture
(registry, torchvision, timm, a class path), and the layers an edit cannot target (CPU, tiny models)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.cli import main
from lightning_backdoor.defenses.activations import capture, editable_layers, get_layer, layer_input, skipped_layers
from lightning_backdoor.models import InputTransform, build_model, input_transform_of

ROOT = Path(__file__).resolve().parents[1]
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


class TinyNet(nn.Module):
    """A class-path model that takes ``num_classes`` but not ``in_channels``."""

    def __init__(self, num_classes: int, hidden: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, hidden, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class PaddedConv(nn.Conv2d):
    """A conv whose forward is not ``F.conv2d`` of its settings (pads at run time, like timm's Conv2dSame)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(inputs, (1, 1, 1, 1)))


def normalised(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CIFAR_MEAN).view(-1, 1, 1), torch.tensor(CIFAR_STD).view(-1, 1, 1)
    return (images - mean) / std


def cifar_classifier(**kwargs: object) -> PoisonedClassifier:
    torch.manual_seed(0)
    return PoisonedClassifier(model="compact", model_kwargs={"widths": [8, 16, 32]}, **kwargs).eval()


# --- the input transform ------------------------------------------------------------------------------------------


def test_normalize_gives_the_bare_networks_logits_on_normalised_inputs() -> None:
    module = cifar_classifier(normalize={"mean": CIFAR_MEAN, "std": CIFAR_STD})
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        # Module.forward skips the hooks: the bare network's computation on what it was trained on.
        expected = module.net.forward(normalised(images))
        torch.testing.assert_close(module(images), expected)
        torch.testing.assert_close(module.net(images), expected)
        unnormalised = module.net.forward(images)  # the transform matters: logits differ by a tenth of their scale
        assert (unnormalised - expected).abs().max() > 0.1 * expected.abs().max()


def test_the_defenses_activation_hooks_see_normalised_inputs() -> None:
    module = cifar_classifier(normalize={"mean": CIFAR_MEAN, "std": CIFAR_STD})
    images = torch.rand(3, 3, 32, 32)
    first = editable_layers(module.net)[0]
    torch.testing.assert_close(layer_input(module.net, first, images), normalised(images))
    keys = capture(module.net, [first], images)[first].keys
    bare = cifar_classifier()
    bare.net.load_state_dict(module.net.state_dict())
    torch.testing.assert_close(keys, capture(bare.net, [first], normalised(images))[first].keys)


def test_deepcopy_pickle_and_compile_keep_the_transform() -> None:
    module = cifar_classifier(normalize={"mean": CIFAR_MEAN, "std": CIFAR_STD})
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = module.net(images)
        for copied in (copy.deepcopy(module.net), pickle.loads(pickle.dumps(module.net))):
            assert input_transform_of(copied) == input_transform_of(module.net)
            torch.testing.assert_close(copied(images), expected)
        compiled = torch.compile(module.net, backend="aot_eager")  # dynamo traces the hook; no C compiler needed
        assert input_transform_of(compiled) == InputTransform(CIFAR_MEAN, CIFAR_STD)
        torch.testing.assert_close(compiled(images), expected, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_are_unchanged_by_the_transform() -> None:
    plain = cifar_classifier()
    transformed = cifar_classifier(normalize={"mean": CIFAR_MEAN, "std": CIFAR_STD}, input_size=32)
    assert list(transformed.state_dict()) == list(plain.state_dict())
    assert list(transformed.net.state_dict()) == list(plain.net.state_dict())
    assert input_transform_of(plain.net) is None and input_transform_of(plain) is None
    assert input_transform_of(transformed) is input_transform_of(transformed.net)
    assert input_transform_of(transformed.net).as_dict() == {"mean": CIFAR_MEAN, "std": CIFAR_STD, "size": 32}


def test_one_value_broadcasts_over_channels() -> None:
    module = cifar_classifier(normalize={"mean": [0.5], "std": [0.25]})
    images = torch.rand(2, 3, 32, 32)
    first = editable_layers(module.net)[0]
    torch.testing.assert_close(layer_input(module.net, first, images), (images - 0.5) / 0.25)


def test_input_size_resizes_other_sizes_only() -> None:
    module = cifar_classifier(input_size=32)
    first = editable_layers(module.net)[0]
    small = torch.rand(2, 3, 16, 16)
    expected = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(layer_input(module.net, first, small), expected)
    exact = torch.rand(2, 3, 32, 32)
    assert torch.equal(layer_input(module.net, first, exact), exact)


def test_attaching_a_second_transform_is_refused() -> None:
    module = cifar_classifier(normalize={"mean": CIFAR_MEAN, "std": CIFAR_STD})
    with pytest.raises(ValueError, match="already has an input transform"):
        InputTransform([0.5], [0.5]).attach(module.net)
    handle = InputTransform([0.5], [0.5]).attach(nn.Identity())
    handle.remove()


@pytest.mark.parametrize(("normalize", "input_size", "message"), [
    ({"mean": CIFAR_MEAN, "std": [0.2, 0.2]}, None, "normalize.mean has 3 values but normalize.std has 2"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, None, "normalize.mean has 2 values but the model reads 3 channels"),
    ({"mean": CIFAR_MEAN, "std": [0.2, 0.0, 0.2]}, None, "normalize.std must be positive"),
    ({"mean": CIFAR_MEAN, "std": [0.2, -0.1, 0.2]}, None, "normalize.std must be positive"),
    ({"mean": [0.5, float("nan"), 0.5], "std": CIFAR_STD}, None, "normalize.mean must hold finite numbers"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, float("inf"), 0.2]}, None, "normalize.std must hold finite numbers"),
    ({"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}, None, "(0-255 units? divide by 255)"),
    ({"mean": [], "std": []}, None, "normalize.mean must be a non-empty list of numbers"),
    ({"mean": CIFAR_MEAN, "stdev": CIFAR_STD}, None, "normalize takes the keys mean and std, got ['mean', 'stdev']"),
    (None, 0, "input_size must be a positive number of pixels, got 0"),
], ids=["lengths_differ", "wrong_channel_count", "zero_std", "negative_std", "nan_mean", "inf_std", "0_255_units",
        "empty", "unknown_key", "zero_size"])
def test_bad_transform_is_refused_in_one_line(normalize, input_size, message) -> None:
    with pytest.raises(ValueError) as error:
        PoisonedClassifier(model="compact", in_channels=3, normalize=normalize, input_size=input_size)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_refuses_a_transform_for_the_wrong_channel_count(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger=false",
              f"--trainer.default_root_dir={run}", "--model.init_args.normalize",
              f"{{mean: {CIFAR_MEAN}, std: {CIFAR_STD}}}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lightning-backdoor: error: normalize.mean has 3 values but the model reads 1 channel", err
    assert not run.exists()


# --- any architecture ---------------------------------------------------------------------------------------------


def test_timm_model_builds_for_the_data_without_pretrained_weights() -> None:
    torch.manual_seed(0)
    model = build_model("timm:resnet18", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    vit = build_model("timm:vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=4).eval()
    with torch.no_grad():
        assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert "blocks.0.attn.qkv" in editable_layers(vit)


def test_misspelt_timm_name_lists_close_matches() -> None:
    with pytest.raises(ValueError) as error:
        build_model("timm:resnet181", num_classes=10)
    message = str(error.value)
    assert message.startswith("unknown timm model 'resnet181'; close matches: ")
    assert "resnet18" in message.split("close matches: ")[1].split(", ")
    assert "\n" not in message


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pretrained": True}, "pretrained weights are never downloaded"),
    ({"no_such_argument": 1}, "timm model 'resnet18' refused model_kwargs ['no_such_argument']"),
])
def test_timm_refuses_downloads_and_unknown_kwargs(kwargs, message) -> None:
    with pytest.raises(ValueError) as error:
        build_model("timm:resnet18", num_classes=10, **kwargs)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_class_path_builds_any_module_with_the_arguments_it_takes() -> None:
    model = build_model(f"{__name__}.TinyNet", num_classes=5, in_channels=3, hidden=6)
    assert isinstance(model, TinyNet)
    assert (model.head.in_features, model.head.out_features) == (6, 5)
    compact = build_model("lightning_backdoor.models.compact.CompactNet", num_classes=4, in_channels=1,
                          widths=(8, 16, 32))
    assert compact(torch.rand(2, 1, 28, 28)).shape == (2, 4)


@pytest.mark.parametrize(("name", "message"), [
    ("lightning_backdoor.models.InputTransform", "is not an nn.Module subclass"),
    ("lightning_backdoor.models.build_model", "is not an nn.Module subclass"),
    ("no_such_package.nets.MyNet", "cannot import model class 'no_such_package.nets.MyNet': No module named"),
    ("lightning_backdoor.models.NoSuchNet", "module 'lightning_backdoor.models' has no 'NoSuchNet'"),
    (f"{__name__}.TinyNet", "does not take model_kwargs ['width']"),
])
def test_bad_class_path_is_refused_in_one_line(name, message) -> None:
    kwargs = {"width": 2} if name.endswith("TinyNet") else {}
    with pytest.raises(ValueError) as error:
        build_model(name, num_classes=5, **kwargs)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_plain_name_lists_every_kind_of_model() -> None:
    with pytest.raises(ValueError) as error:
        build_model("resnet181", num_classes=10)
    message = str(error.value)
    for kind in ("compact", "torchvision:<name>", "timm:<name>", "package.module.Class"):
        assert kind in message


# --- layers an edit cannot target ---------------------------------------------------------------------------------


def test_skipped_layers_say_why_and_editable_layers_leave_them_out() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.Conv2d(16, 16, 1, groups=4), PaddedConv(16, 8, 3), nn.BatchNorm2d(8),
                          nn.Flatten(), nn.LazyLinear(4))
    model(torch.rand(1, 3, 8, 8))  # materialise the lazy layer
    skipped = skipped_layers(model)
    assert skipped == {
        "1": "depthwise conv (groups=16) cannot be edited as one key->value map",
        "2": "grouped conv (groups=4) cannot be edited as one key->value map",
        "3": "PaddedConv overrides Conv2d.forward, so its output is not its weight applied to its unfolded input",
    }
    assert editable_layers(model) == ["0", "6"]
    with pytest.raises(ValueError, match=r"layer '1' cannot be edited: depthwise conv \(groups=16\)"):
        get_layer(model, "1")


def test_multihead_attention_projection_is_skipped() -> None:
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2)
    assert "self_attn.out_proj" in skipped_layers(model)
    assert "self_attn.out_proj" not in editable_layers(model)
    assert "linear1" in editable_layers(model)
