"""Weights saved by whatever held the network (bare, DataParallel/DDP, torch.compile, a wrapper attribute, a nested
checkpoint) load into the model spec's network exactly, with the mapping said in one line; anything else is
refused naming the first mismatching key (CPU, a tiny network)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.io import NESTED_WEIGHTS_KEYS, load_state_dict
from lightning_backdoor.models import build_model
from lightning_backdoor.weights import WeightsMapping, load_weights, map_weights

WIDTHS = [8, 16, 32]


class Holder(nn.Module):
    """A wrapper that keeps the network as an attribute, as many training scripts do."""

    def __init__(self, name: str, network: nn.Module) -> None:
        super().__init__()
        self.add_module(name, network)


def trained_network() -> nn.Module:
    """A network with weights and BatchNorm statistics unlike a fresh one's."""
    torch.manual_seed(1)
    network = build_model("compact", num_classes=10, in_channels=3, widths=WIDTHS)
    with torch.no_grad():
        for tensor in network.state_dict().values():
            tensor.copy_(torch.randint_like(tensor, 1, 100) if tensor.dtype == torch.long else
                         torch.rand_like(tensor) + 0.5)
    return network


def fresh_classifier() -> PoisonedClassifier:
    torch.manual_seed(0)
    return PoisonedClassifier(model="compact", model_kwargs={"widths": WIDTHS})


def assert_loaded(module: PoisonedClassifier, network: nn.Module) -> None:
    loaded, source = module.net.state_dict(), network.state_dict()
    assert list(loaded) == list(source)
    for key in source:
        assert torch.equal(loaded[key], source[key]), key


#: wrapper -> (its state_dict of the network, the prefix every key gets)
WRAPPERS: dict[str, tuple[Callable[[nn.Module], dict[str, Tensor]], str]] = {
    "bare": (lambda network: network.state_dict(), ""),
    "data_parallel": (lambda network: nn.DataParallel(network).state_dict(), "module."),
    "compiled": (lambda network: torch.compile(network).state_dict(), "_orig_mod."),
    "model_attribute": (lambda network: Holder("model", network).state_dict(), "model."),
    "net_attribute": (lambda network: Holder("net", network).state_dict(), "net."),
    "data_parallel_of_compiled": (lambda network: nn.DataParallel(torch.compile(network)).state_dict(),
                                  "module._orig_mod."),
    "compiled_data_parallel_of_lightning_module": (
        lambda network: torch.compile(nn.DataParallel(Holder("net", network))).state_dict(),
        "_orig_mod.module.net."),
    # any other single attribute (a new user's file saved from a wrapper holding its net as ``backbone``)
    "backbone_attribute": (lambda network: Holder("backbone", network).state_dict(), "backbone."),
    "data_parallel_of_backbone": (lambda network: nn.DataParallel(Holder("backbone", network)).state_dict(),
                                  "module.backbone."),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_every_wrapper_layout_loads_exactly_and_says_so(wrapper: str, capsys: pytest.CaptureFixture[str]) -> None:
    network = trained_network()
    state_dict_of, prefix = WRAPPERS[wrapper]
    state_dict = state_dict_of(network)
    assert all(key.startswith(prefix) for key in state_dict)  # the real wrapper's layout, as the test assumes
    module = fresh_classifier()
    mapping = load_weights(module, state_dict)
    assert_loaded(module, network)
    count = len(network.state_dict())
    assert mapping == WeightsMapping(prefix, count, "net")
    expected = (f"weights: loaded {count} keys into net (keys net.*, as lightning-backdoor saves them)"
                if prefix == "net." else
                f"weights: stripped {prefix!r} from {count} keys and loaded them into net" if prefix else
                f"weights: loaded {count} keys into net as named")
    assert capsys.readouterr().out.strip().splitlines() == [expected]


@pytest.mark.parametrize("key", NESTED_WEIGHTS_KEYS)
def test_nested_checkpoint_files_load(key: str, tmp_path: Path) -> None:
    network = trained_network()
    torch.save({key: nn.DataParallel(network).state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}},
               tmp_path / "weights.pt")
    module = fresh_classifier()
    assert load_weights(module, load_state_dict(tmp_path / "weights.pt")).stripped == "module."
    assert_loaded(module, network)


def test_safetensors_of_a_compiled_network_loads(tmp_path: Path) -> None:
    network = trained_network()
    save_file(torch.compile(network).state_dict(), str(tmp_path / "weights.safetensors"))
    module = fresh_classifier()
    assert load_weights(module, load_state_dict(tmp_path / "weights.safetensors")).stripped == "_orig_mod."
    assert_loaded(module, network)


def test_a_submodule_named_like_a_wrapper_is_not_stripped() -> None:
    # The model itself holds its network as ``model``: the file's keys match as named, so nothing is stripped.
    source, target = Holder("model", trained_network()), Holder("model", build_model("compact", 10, widths=WIDTHS))
    mapping = load_weights(target, source.state_dict())
    assert mapping == WeightsMapping("", len(source.state_dict()), "Holder")
    assert all(torch.equal(target.state_dict()[key], value) for key, value in source.state_dict().items())


def test_absent_batchnorm_counters_are_tolerated_and_said(capsys: pytest.CaptureFixture[str]) -> None:
    network = trained_network()
    state_dict = {key: value for key, value in nn.DataParallel(network).state_dict().items()
                  if not key.endswith("num_batches_tracked")}
    counters = len(network.state_dict()) - len(state_dict)
    assert counters > 0
    module = fresh_classifier()
    before = {key: value.clone() for key, value in module.net.state_dict().items()}
    mapping = load_weights(module, state_dict)
    assert mapping.absent_counters == counters and mapping.loaded == len(state_dict)
    for key, value in module.net.state_dict().items():
        expected = before[key] if key.endswith("num_batches_tracked") else network.state_dict()[key]
        assert torch.equal(value, expected), key
    assert f"; {counters} BatchNorm num_batches_tracked counters are absent" in capsys.readouterr().out


def without(state_dict: dict[str, Tensor], key: str) -> dict[str, Tensor]:
    return {name: value for name, value in state_dict.items() if name != key}


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda sd: without(sd, "module.head.weight"), "first mismatching key 'module.head.weight' (missing from the "
                                                   "checkpoint)"),
    (lambda sd: sd | {"module.extra.weight": torch.zeros(2)}, "first mismatching key 'module.extra.weight' (not in "
                                                              "the model)"),
    (lambda sd: sd | {"module.head.weight": torch.zeros(3, 32)}, "first mismatching key 'module.head.weight' "
                                                                 "(shape (3, 32) in the checkpoint vs (10, 32)"),
    # No prefix is shared by every key: only the keys as named are tried, and 'head.weight' alone matches.
    (lambda sd: {key.removeprefix("module.") if "head" in key else key: value for key, value in sd.items()},
     "first mismatching key 'blocks.0.conv1.weight' (missing from the checkpoint); 42 of its 43 keys start with "
     "'module.' and the others do not"),
    (lambda sd: {}, "checkpoint holds no weights"),
    # the file's keys and the model's begin with other names: both said (another architecture, or a split model)
    (lambda sd: {("module.encoder." if "blocks" in key else "module.classifier.") + key.partition(".")[2].partition(
        ".")[2]: value for key, value in sd.items()},
     "first mismatching key 'blocks.0.conv1.weight' (missing from the checkpoint); the checkpoint's 43 keys "
     "begin with 'encoder.' (36), 'classifier.' (7) after 'module.', the model's 43 with 'blocks.' (36), 'stem.' "
     "(6), 'head.' (1)"),
], ids=["missing", "extra", "shape", "mixed_prefixes", "empty", "other_names"])
def test_a_mismatch_is_refused_naming_the_first_key(corrupt, message: str) -> None:
    network = trained_network()
    module = fresh_classifier()
    before = {key: value.clone() for key, value in module.net.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_weights(module, corrupt(nn.DataParallel(network).state_dict()))
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert all(torch.equal(module.net.state_dict()[key], value) for key, value in before.items())  # nothing loaded


def test_a_lightning_checkpoint_of_another_width_names_its_own_key() -> None:
    torch.manual_seed(0)
    other = PoisonedClassifier(model="compact", model_kwargs={"widths": [16, 16, 32]})
    with pytest.raises(ValueError, match=r"first mismatching key 'net\.blocks\.0\.conv1\.weight' \(shape"):
        load_weights(fresh_classifier(), other.state_dict())


def test_map_weights_is_pure() -> None:
    network = trained_network()
    state_dict = nn.DataParallel(network).state_dict()
    strip, mapped = map_weights(network.state_dict(), state_dict)
    assert strip == "module." and set(mapped) == set(network.state_dict())
    assert all(key.startswith("module.") for key in state_dict)  # the input is not renamed in place


@pytest.mark.parametrize("weights_have_layerscale", [True, False])
def test_layerscale_on_one_side_only_is_refused_with_what_to_change(weights_have_layerscale: bool) -> None:
    """A timm ViT's weights with LayerScale (``ls1.gamma``/``ls2.gamma``) and a model built without it, or the
    reverse: the one line says which ``init_values`` to add or drop."""
    pytest.importorskip("timm")
    settings = {"num_classes": 3, "in_channels": 1, "img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 1,
                "num_heads": 2, "edit_blocks": 1}
    with_scale, without = build_model("vit", init_values=1e-4, **settings), build_model("vit", **settings)
    weights, model = (with_scale, without) if weights_have_layerscale else (without, with_scale)
    hint = ("the weights have LayerScale: add init_values" if weights_have_layerscale else
            "the weights have no LayerScale: drop init_values")
    with pytest.raises(ValueError, match=f"first mismatching key 'blocks.0.ls[12].gamma' .*; {hint}"):
        map_weights(model.state_dict(), weights.state_dict())


def test_weights_of_another_float_dtype_are_cast_and_said(capsys: pytest.CaptureFixture[str]) -> None:
    network = trained_network()
    half = {key: value.half() if value.is_floating_point() else value for key, value in network.state_dict().items()}
    module = fresh_classifier()
    mapping = load_weights(module, half)
    assert mapping.converted == (("float16", "float32"),)
    assert "; cast float16 to float32" in capsys.readouterr().out
    assert all(value.dtype != torch.float16 for value in module.net.state_dict().values())
    assert load_weights(fresh_classifier(), network.state_dict()).converted == ()  # same dtype: nothing said
