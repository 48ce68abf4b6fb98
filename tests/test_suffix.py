"""The held-out passes' shortcut (:class:`SuffixPasses`): with a layer edited, the graph after it over recorded
values gives the whole model's logits; where it cannot (untraceable, bypassed hooks, batch-dependent values,
in-place changes, memory) it says why and runs whole passes, with the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.activation_editing import get_layer, predict_logits, trial_edit
from lightning_backdoor.defenses.adapt import returning_logits
from lightning_backdoor.defenses.activations import auto_candidates
from lightning_backdoor.defenses.residual import residual_branch_of
from lightning_backdoor.defenses.suffix import SuffixPasses
from lightning_backdoor.models import build_model
from lightning_backdoor.models.input_transform import InputTransform
from lightning_backdoor.triggers import BadNets


def edited_logits(net: nn.Module, passes: SuffixPasses, layer: str, images: torch.Tensor, rows: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The shortcut's and a whole pass's logits of ``images[rows]`` with a random edit of ``layer``."""
    weight = get_layer(net, layer).weight
    delta = torch.randn(weight.shape[0], weight[0].numel()) * 0.05
    with trial_edit(net, layer, delta):
        return passes.logits(layer, "clean", images, rows), predict_logits(net, images[rows])


@pytest.mark.parametrize("hooked", [True, False], ids=["recorded-by-hooks", "recorded-by-a-pass"])
@pytest.mark.parametrize("spec", ["compact", "preact_resnet18", "vit", "torchvision:mobilenet_v3_small"])
def test_the_suffix_of_an_edited_layer_gives_the_whole_models_logits(spec, hooked):
    torch.manual_seed(0)
    net = build_model(spec, num_classes=10, in_channels=3).eval()
    InputTransform([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).attach(net)  # a root pre-hook, applied by the shortcut too
    images = torch.rand(10, 3, 32, 32)
    layers = auto_candidates(net, 3, images[:1])
    passes = SuffixPasses(net, layers, batch_size=4)  # several chunks
    if hooked:  # during passes the caller makes anyway (the defense's capture of keys); our ViT's residual stream
        # is no module's input or output, so `finish` makes its own pass there
        assert (passes.locators is None) == (spec == "vit")
        with passes.recording("clean"):
            logits = predict_logits(net, images, batch_size=3)
        passes.finish("clean", images, logits)
    else:
        passes.record("clean", images)
    assert passes.active, passes.reason
    rows = torch.tensor([True, False] * 5)
    unedited, changed = predict_logits(net, images[rows]), []
    for layer in layers:
        shortcut, whole = edited_logits(net, passes, layer, images, rows)
        changed.append(not torch.equal(whole, unedited))
        torch.testing.assert_close(shortcut, whole, atol=1e-5, rtol=1e-5)
    assert any(changed)  # the edits reach the logits (an untrained net may hide one layer's)


class Branching(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(h.mean((2, 3)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Plain(nn.Module):
    """Traceable; ``count_rows`` reads the batch size before the edited layer, ``mutate`` changes the edited layer's
    input in place after the layer read it."""

    def __init__(self, count_rows: bool = False, mutate: bool = False) -> None:
        super().__init__()
        self.block, self.conv, self.head = Block(), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)
        self.count_rows, self.mutate = count_rows, mutate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        h = torch.relu(self.block(x))
        out = self.conv(h)
        if self.mutate:
            h.mul_(2)
            out = out + h[:, :1]
        return self.head((out.reshape(rows, -1) if self.count_rows else out.flatten(1)))


class Clamping(nn.Module):
    """Every value the conv's suffix reads is a module's input or output, but one of them (the conv's input) is
    clamped in place after the conv read it."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.conv = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.clamp, self.head = nn.Hardtanh(-0.05, 0.05, inplace=True), nn.Linear(4, 2)
        self.side = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        out = self.conv(h)
        return self.head(out.mean((2, 3))) + self.side(self.clamp(h))


@pytest.mark.parametrize("make, layer, reason", [
    (Branching, "conv", "does not trace with torch.fx"),
    (lambda: Plain(count_rows=True), "conv", "not one row per image"),
    (lambda: Plain(mutate=True), "conv", "does not reproduce the model's logits"),
    ("hooked", "conv", "module 'block' has a hook"),
    ("tight", "conv", "would exceed"),
    ("tight, recorded by hooks", "conv", "would exceed"),  # stopped while recording, not after
    (Clamping, "conv", "does not reproduce the model's logits"),
])
def test_whole_passes_where_the_shortcut_cannot_hold(make, layer, reason):
    torch.manual_seed(0)
    net = (Plain() if isinstance(make, str) else make()).eval()
    if make == "hooked":  # a hook on a module the trace goes through would not run in the traced graph
        net.block.register_forward_hook(lambda module, args, output: output * 1.5)
    images = torch.rand(6, 3, 8, 8)
    passes = SuffixPasses(net, [layer], memory=1 if str(make).startswith("tight") else None)
    if make is Clamping or make == "tight, recorded by hooks":  # Clamping: the conv's input, kept by a pre-hook,
        # is changed in place later
        assert passes.locators is not None
        with passes.recording("clean"):
            logits = predict_logits(net, images, batch_size=2)
            if make != Clamping:
                assert not passes.active and not passes.pending  # nothing more is kept once over the limit
        passes.finish("clean", images, logits)
    else:
        passes.record("clean", images)
    assert not passes.active and reason in passes.reason
    shortcut, whole = edited_logits(net, passes, layer, images, torch.arange(3))
    torch.testing.assert_close(shortcut, whole, atol=0, rtol=0)


def test_the_defenses_own_logits_hook_keeps_the_shortcut():
    """The callback and ``defend`` run the defense inside :func:`returning_logits` (a forward hook on the model that
    takes the logits from a tuple or dict output): the shortcut does the same to the graph's output."""
    torch.manual_seed(0)
    net = Plain().eval()
    images = torch.rand(6, 3, 8, 8)
    with returning_logits(net):
        passes = SuffixPasses(net, ["conv"])
        passes.record("clean", images)
        assert passes.active, passes.reason
        shortcut, whole = edited_logits(net, passes, "conv", images, torch.arange(3))
    torch.testing.assert_close(shortcut, whole, atol=1e-6, rtol=1e-6)


def test_the_defense_chooses_and_edits_the_same_with_and_without_the_shortcut(monkeypatch):
    """Layer, strength and weights as with whole passes (18 options scored on U), and the report says which ran."""
    torch.manual_seed(0)
    net = build_model("compact", num_classes=10, in_channels=3).eval()
    images, labels = torch.rand(40, 3, 32, 32), torch.arange(40) % 10
    unseen, knowledge = UnseenData(images, labels), BackdoorKnowledge.of(BadNets(size=3), 0)
    defense = ActivationEditing(layer="auto", strength=None, seed=0)
    fast = build_model("compact", num_classes=10, in_channels=3).eval()
    fast.load_state_dict(net.state_dict())
    result = defense.defend(fast, unseen, knowledge)
    assert result.details["held_out_passes"] == "suffix"

    def disabled(self, layers):
        self.reason = "disabled"
    monkeypatch.setattr(SuffixPasses, "_build", disabled)
    slow = build_model("compact", num_classes=10, in_channels=3).eval()
    slow.load_state_dict(net.state_dict())
    reference = defense.defend(slow, unseen, knowledge)
    assert reference.details["held_out_passes"] == "whole (disabled)"
    assert (result.layer, result.details["strength"]) == (reference.layer, reference.details["strength"])
    assert result.details["selection"] == reference.details["selection"]
    for name, value in fast.state_dict().items():
        torch.testing.assert_close(value, slow.state_dict()[name], atol=1e-6, rtol=1e-5)


class Keeping(nn.Module):
    """Keeps its features on itself in ``forward``, as models read by Grad-CAM-like tools do."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Block(), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features = self.block(x)
        return self.head(self.features.mean((2, 3)))


def test_tracing_leaves_nothing_of_the_trace_on_the_model() -> None:
    """The shortcut and the residual-block search trace the model with torch.fx, which runs its forward on proxies:
    an attribute the forward sets keeps what the last real pass set, and the model still deep-copies."""
    torch.manual_seed(0)
    model = Keeping().eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 8, 8))
    kept = model.features
    assert residual_branch_of(model, "block.conv") is not None  # traced the model and its block
    passes = SuffixPasses(model, ["block.conv", "head"])
    assert passes.reason is None
    assert model.features is kept
    copy.deepcopy(model)
