"""Editing a Vision Transformer: a Linear layer applied per token reads each token's input as a key (the token grid
plays a conv's positions), the MLP's output layer is corrected for the residual stream (the block's skip path),
``layer: auto`` tries the last blocks' MLP layers, and a tiny ViT trained on real digits is defended end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from plain_training import train_epochs
from skip_correction import skip_correction_gaps
from torch import Tensor, nn

from lightning_backdoor import PoisonedDataModule
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.activation_editing import EditProblem, add_delta, predict_logits
from lightning_backdoor.defenses.activations import auto_candidates, capture, editable_layers, get_layer
from lightning_backdoor.defenses.residual import residual_block_of
from lightning_backdoor.models import build_model
from lightning_backdoor.triggers import BadNets

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

pytest.importorskip("timm")

TOKENS, WIDTH, OUTPUTS = 5, 4, 3


def token_world() -> tuple[nn.Module, Tensor, Tensor]:
    """A Linear layer applied to every token of (N, T=5, D=4) sequences, clean tokens in span(e0, e1) and a trigger
    that adds e3 to the last token only. Returns the model (its layer is ``"0"``), clean and triggered sequences."""
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(WIDTH, OUTPUTS)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(OUTPUTS, WIDTH, generator=generator))
        layer.bias.copy_(torch.randn(OUTPUTS, generator=generator))
    clean = torch.zeros(6, TOKENS, WIDTH)
    clean[..., :2] = torch.randn(6, TOKENS, 2, generator=generator)
    triggered = clean.clone()
    triggered[:, -1, 3] += 1.0
    return nn.Sequential(layer).eval(), clean, triggered


def test_a_per_token_linear_layer_reads_each_token_as_a_key() -> None:
    model, clean, _ = token_world()
    acts = capture(model, ["0"], clean)["0"]
    layer = get_layer(model, "0")
    assert acts.keys.shape == (6, TOKENS, WIDTH) and acts.values.shape == (6, TOKENS, OUTPUTS)
    assert torch.equal(acts.keys, clean)  # B·T keys: every token's input vector
    assert torch.allclose(acts.values, clean @ layer.weight.T, atol=1e-6)  # W k, the bias taken off
    assert acts.skip is None


def test_triggered_tokens_land_on_their_values_and_clean_tokens_keep_theirs() -> None:
    """Hand-computed: triggered keys are k + e3 with values W0 k, clean keys never leave span(e0, e1), so the exact
    edit is ΔW = −W0 e3 e3ᵀ (the layer stops reading e3); the least-squares edit must find it."""
    model, clean, triggered = token_world()
    layer = get_layer(model, "0")
    weight = layer.weight.detach().clone()
    clean_acts = capture(model, ["0"], clean)["0"]
    triggered_acts = capture(model, ["0"], triggered)["0"]
    labels = torch.ones(6, dtype=torch.long)  # no image of the target class 0: every image is edited with
    problem = EditProblem.build(layer, clean_acts, triggered_acts, labels, 0, None)
    assert problem.triggered_count.item() == 6 * TOKENS  # B·T keys, the untouched tokens among them
    delta = problem.solve("closed_form", strength=1e-4, rank=0)
    expected = torch.zeros_like(weight)
    expected[:, 3] = -weight[:, 3]
    assert torch.allclose(delta, expected, atol=1e-3)
    add_delta(model, "0", delta)
    with torch.no_grad():
        after_triggered, after_clean = model(triggered), model(clean)
        before_clean = clean @ weight.T + layer.bias
    assert torch.allclose(after_triggered, before_clean, atol=1e-3)  # the triggered token lands on its value
    assert torch.allclose(after_clean, before_clean, atol=1e-3)  # every clean token keeps its value


def tiny_vit(**overrides) -> nn.Module:
    """A ViT for 8x8 one-channel images: 2x2 patches (a 4x4 token grid), width 16, two blocks."""
    settings = {"in_channels": 1, "img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2,
                "mlp_ratio": 4.0, "edit_blocks": 1} | overrides
    return build_model("vit", num_classes=10, **settings)


def test_the_mlp_output_layer_of_a_transformer_block_is_its_residual_branch() -> None:
    torch.manual_seed(0)
    model = tiny_vit().eval()
    images = torch.rand(3, 1, 8, 8)
    assert residual_block_of(model, "blocks.1.mlp.fc2") == "blocks.1"
    assert residual_block_of(model, "blocks.1.mlp.fc1") is None  # a GELU follows: not the block's last operation
    assert residual_block_of(model, "blocks.1.attn.proj") is None  # the MLP runs after its addition
    stream = []  # the residual stream entering the MLP: the input of norm2
    norm2 = model.get_submodule("blocks.1.norm2")
    handle = norm2.register_forward_pre_hook(lambda module, args: stream.append(args[0]))
    acts = capture(model, ["blocks.1.mlp.fc2"], images)["blocks.1.mlp.fc2"]
    handle.remove()
    assert acts.keys.shape == (3, 16, 64) and acts.skip.shape == (3, 16, 16)
    assert torch.allclose(acts.skip, stream[0], atol=1e-5)


def assert_the_correction_cancels_a_patch(model: nn.Module, block: str = "blocks.1", layer: str = "mlp.fc2",
                                          channels: int = 1) -> None:
    """The corrected edit of ``layer`` in ``block`` (one image, a 3x3 white patch) brings the block's output on the
    triggered image to the clean one (< 5 % of the gap left); the edit blind to the stream leaves > 30 %."""
    clean_images = torch.rand(1, channels, 8, 8)
    triggered_images = clean_images.clone()
    triggered_images[:, :, -3:, -3:] = 1.0
    before, results = skip_correction_gaps(model, f"{block}.{layer}", block, clean_images, triggered_images)
    assert results[True] < 0.05 * before
    assert results[False] > 0.3 * before


def layerscale_twin(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """The same function as ``model`` (a timm ViT without LayerScale), with a LayerScale of random factors
    γ ∈ [0.05, 2] after every block's fc2 and fc2's rows divided by γ: a block's output is γ ⊙ fc2(·) + stream."""
    from timm.layers import LayerScale

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block in twin.blocks:
            gamma = torch.rand(block.mlp.fc2.out_features, generator=generator) * 1.95 + 0.05
            block.ls2 = LayerScale(len(gamma))
            block.ls2.gamma.copy_(gamma)
            block.mlp.fc2.weight.div_(gamma[:, None])
            block.mlp.fc2.bias.div_(gamma)
    return twin.eval()


def test_a_layerscale_block_is_corrected_through_its_scale() -> None:
    """LayerScale multiplies fc2's output by γ before the addition, as an eval-mode BatchNorm without shift: the block
    is recognised with ``ls2`` as its per-channel scale, the skip term is captured in fc2's units (stream / γ),
    ``auto`` tries the MLP layers, and the corrected edit cancels the trigger at the block's output."""
    from lightning_backdoor.defenses.residual import ResidualBranch, channel_scale, residual_branch_of

    torch.manual_seed(0)
    model = layerscale_twin(tiny_vit(), torch.Generator().manual_seed(1))
    assert residual_branch_of(model, "blocks.1.mlp.fc2") == ResidualBranch("blocks.1", "blocks.1.ls2")
    del model.edit_candidates  # as a user's LayerScale ViT: auto finds the MLP layers by the blocks' class
    assert auto_candidates(model, 3) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    images = torch.rand(3, 1, 8, 8)
    stream = []  # the residual stream entering the MLP: the input of norm2
    norm2 = model.get_submodule("blocks.1.norm2")
    handle = norm2.register_forward_pre_hook(lambda module, args: stream.append(args[0]))
    acts = capture(model, ["blocks.1.mlp.fc2"], images)["blocks.1.mlp.fc2"]
    handle.remove()
    gamma = channel_scale(model.get_submodule("blocks.1.ls2"))
    assert torch.allclose(acts.skip, stream[0] / gamma, atol=1e-4)
    assert_the_correction_cancels_a_patch(model)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_layerscale_vit_is_defended_as_its_plain_twin(inplace: bool) -> None:
    """A ViT and its LayerScale twin compute the same function; the edit's least squares are separate per output
    channel, so the defended twin must compute the defended plain model's function too (γ only rescales fc2's rows).
    An in-place LayerScale (``x.mul_(γ)`` on fc2's own output) must not corrupt the captured values."""
    torch.manual_seed(0)
    model = tiny_vit().eval()
    with torch.no_grad():  # fc2 of a trained model's scale (timm initialises it 50x smaller): values matter
        for block in model.blocks:
            block.mlp.fc2.weight.normal_(0, block.mlp.fc2.in_features ** -0.5)
    twin = layerscale_twin(model, torch.Generator().manual_seed(1))
    for block in twin.blocks:
        block.ls2.inplace = inplace
    clean = torch.rand(20, 1, 8, 8)
    labels = torch.arange(20) % 4
    triggered = clean.clone()
    triggered[:, :, -2:, -2:] = 1.0
    with torch.no_grad():
        assert torch.allclose(model(clean), twin(clean), atol=1e-4)
    outputs = {}
    with torch.no_grad():
        undefended, undefended_clean = model(triggered), model(clean)
    for name, network in (("plain", model), ("twin", twin)):
        ActivationEditing(layer="blocks.1.mlp.fc2", strength=0.01).defend(
            network, UnseenData(clean, labels), BackdoorKnowledge.of(BadNets(size=2), 0))
        with torch.no_grad():
            outputs[name] = (network(clean), network(triggered))
    # the edit moved the triggered outputs toward the clean ones; the twin's outputs moved the same way
    gap_before, gap_after = (undefended - undefended_clean).norm(), (outputs["plain"][1] - undefended_clean).norm()
    change = (outputs["plain"][1] - undefended).norm()
    assert gap_after < 0.7 * gap_before
    assert (outputs["plain"][0] - outputs["twin"][0]).norm() < 0.01 * change
    assert (outputs["plain"][1] - outputs["twin"][1]).norm() < 0.01 * change


@pytest.mark.parametrize("block_fn", ["ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock"])
def test_other_timm_transformer_blocks_are_not_taken_for_a_plain_block(block_fn: str) -> None:
    """Blocks that normalise after the addition (post-norm) or run attention and MLP in parallel have no
    ``x + fc2(·)`` output: neither the correction nor the MLP candidates apply to them."""
    from timm.models import vision_transformer

    from lightning_backdoor.defenses.residual import transformer_mlp_layers

    model = vision_transformer.VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16,
                                                 depth=2, num_heads=2, block_fn=getattr(vision_transformer, block_fn))
    assert transformer_mlp_layers(model) == []
    assert all(residual_block_of(model, name) is None for name in editable_layers(model))


def test_any_timm_vit_gets_the_residual_correction_and_the_candidates_without_declaring_anything() -> None:
    """A ViT as a user holds it (timm's own builder, class token, no ``edit_candidates``, no declared branches): its
    blocks' fc2 are recognised as residual branches by class, ``auto`` tries its last blocks' MLP layers, and the
    corrected edit cancels the trigger in the stream as it does on the registry's ``vit``."""
    torch.manual_seed(0)
    model = build_model("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, img_size=8, patch_size=2,
                        embed_dim=16, depth=2, num_heads=2).eval()
    assert not hasattr(model, "edit_candidates") and not hasattr(model.blocks[1], "residual_branch")
    assert residual_block_of(model, "blocks.1.mlp.fc2") == "blocks.1"
    assert residual_block_of(model, "blocks.1.mlp.fc1") is None and residual_block_of(model, "head") is None
    # auto tries what the registry's vit declares: the last two blocks' MLP layers, not the head
    assert auto_candidates(model, 3, torch.rand(1, 1, 8, 8)) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc1",
                                                                 "blocks.1.mlp.fc2"]
    assert_the_correction_cancels_a_patch(model)


def test_a_torchvision_vit_gets_the_residual_correction_and_the_candidates_too() -> None:
    """torchvision's ViT (``EncoderBlock``, its MLP ``mlp.0`` / ``mlp.3``): ``mlp.3`` is recognised as the residual
    branch by class, ``auto`` tries the last two blocks' MLP layers, and the corrected edit cancels the trigger in the
    stream (17 token keys, class token included, in ``mlp.3``'s 64 input dimensions: an exact edit exists)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=8, patch_size=2, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=64, num_classes=10).eval()
    blocks = "encoder.layers.encoder_layer_"
    assert residual_block_of(model, f"{blocks}1.mlp.3") == f"{blocks}1"
    assert residual_block_of(model, f"{blocks}1.mlp.0") is None and residual_block_of(model, "heads.head") is None
    assert auto_candidates(model, 3, torch.rand(1, 3, 8, 8)) == [f"{blocks}0.mlp.3", f"{blocks}1.mlp.0",
                                                                 f"{blocks}1.mlp.3"]
    assert_the_correction_cancels_a_patch(model, f"{blocks}1", "mlp.3", channels=3)


def test_the_residual_correction_makes_the_block_output_on_triggered_tokens_match_the_clean_one() -> None:
    """Mapping fc2's triggered keys to their clean values alone leaves the trigger in the residual stream; the
    correction (target = clean value + clean skip − triggered skip) cancels it at the block's output. One image: its
    16 token keys in fc2's 64 input dimensions, so an exact edit exists (attention mixes the tokens: all 16 move)."""
    torch.manual_seed(0)
    assert_the_correction_cancels_a_patch(tiny_vit().eval())


def test_auto_tries_the_last_blocks_mlp_layers() -> None:
    model = tiny_vit(depth=3, edit_blocks=2)
    assert model.edit_candidates == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "blocks.2.mlp.fc1", "blocks.2.mlp.fc2"]
    assert set(model.edit_candidates) <= set(editable_layers(model))
    assert auto_candidates(model, 3) == model.edit_candidates[-3:]
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 10))  # declares nothing: as before
    assert auto_candidates(plain, 3) == editable_layers(plain)[-3:]


def rates(model: nn.Module, test: tuple[Tensor, ...], target_class: int) -> dict[str, float]:
    """CA, ASR and ASR floor (%) of ``model`` on the test split (uint8 images, labels, triggered images, labels)."""
    images, labels, triggered = (test[0].float() / 255, test[1], test[2].float() / 255)
    attacked = labels != target_class
    clean_predictions = predict_logits(model, images).argmax(-1)
    triggered_predictions = predict_logits(model, triggered[attacked]).argmax(-1)
    return {"ca": 100 * (clean_predictions == labels).float().mean().item(),
            "asr": 100 * (triggered_predictions == target_class).float().mean().item(),
            "floor": 100 * (clean_predictions[attacked] == target_class).float().mean().item()}


def test_a_tiny_vit_trained_on_poisoned_digits_is_defended_end_to_end() -> None:
    """Real data (scikit-learn's 8x8 digits, a 2x2 BadNets patch, one token, toward class 0 on 10 % of the training
    images), real training (5-10 s), ``layer: auto`` over both blocks' MLP layers with λ chosen on U, 10 unseen
    images per class. This two-block ViT on 4x4 tokens is a hard case (the default λ = 10 leaves ASR at 21 %;
    docs/results/vit.md); the margins below are the method's claim on it, not its CIFAR-10 goals. Measured with
    the one-standard-error rule of ``auto``: two threads, CA 88.7 → 86.3 %, ASR 90.0 → 2.2 % (floor 0.0 %); one
    thread (the suite's workers), CA 91.7 → 82.0 %, ASR 100 → 3.7 %: there the lowest loss was ``blocks.0.mlp.fc2``
    (CA 87.3 %, ASR 1.5 %) and the rule kept ``blocks.1.mlp.fc2``, whose larger change of the clean predictions
    on U (KL 0.24 against 0.15 nats) is within its noise (paired difference 0.09 ± 0.10)."""
    torch.manual_seed(0)
    data = PoisonedDataModule(source="digits", trigger=BadNets(size=2), poison_rate=0.1, unseen_per_class=10,
                              batch_size=64)
    data.setup("fit")
    model = tiny_vit(embed_dim=48, mlp_ratio=2.0, edit_blocks=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    train_epochs(model, data, optimizer, 20)
    test = data.test_dataset().tensors
    before = rates(model, test, 0)
    assert before["asr"] > 95 and before["ca"] > 85, before  # the backdoor took, and the model works
    unseen_images = data.unseen_set(10)
    unseen = UnseenData(unseen_images.images.float() / 255, unseen_images.labels)
    defense = ActivationEditing(layer="auto", candidates=4, strength=None)
    result = defense.defend(model, unseen, BackdoorKnowledge.of(data.trigger, 0))
    after = rates(model, test, 0)
    assert result.layer in model.edit_candidates
    tried = {key.split(" ")[0] for key in result.details["selection"]["cross_validated_loss_on_unseen"]}
    assert tried == set(model.edit_candidates)
    assert after["asr"] < after["floor"] + 10, (before, after)
    assert after["ca"] > before["ca"] - 12, (before, after)


def test_the_feature_estimator_says_why_it_does_not_apply_to_a_vit() -> None:
    """A ViT's only convolution (its patch embedding) reads the image: the feature estimator has no feature space to
    invert in and is skipped with its reason; asked for alone, the estimate refuses in one line."""
    from lightning_backdoor.defenses.estimation import TriggerEstimator

    torch.manual_seed(0)
    model = tiny_vit().eval()
    unseen = UnseenData(torch.rand(50, 1, 8, 8), torch.arange(10).repeat(5))
    with pytest.raises(ValueError, match=r"^no trigger estimator applies to this model: feature: .*reads the image"):
        TriggerEstimator(estimators=("feature",), progress=False).estimate(model, unseen)
    estimate = TriggerEstimator(estimators=("perturbation", "feature"), max_steps=3, progress=False).estimate(
        model, unseen)
    assert set(estimate.details["not_applicable"]) == {"feature"}
    assert set(estimate.details["trigger_size"]) == {"perturbation"}


def test_auto_tries_more_blocks_than_the_model_declares_when_asked() -> None:
    """The registry's ViT declares the MLP layers of its last ``edit_blocks`` blocks; asked for more candidates,
    ``auto`` takes the MLP layers of as many last blocks as they need (on the CIFAR-10 ViT a Blended trigger is
    removed at the third-last block's ``fc2``, not at the last two: docs/results/vit.md)."""
    model = tiny_vit(depth=3, edit_blocks=1)
    assert auto_candidates(model, 2) == ["blocks.2.mlp.fc1", "blocks.2.mlp.fc2"]  # what it declares
    assert auto_candidates(model, 1) == ["blocks.2.mlp.fc2"]
    assert auto_candidates(model, 4) == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "blocks.2.mlp.fc1", "blocks.2.mlp.fc2"]
    assert auto_candidates(model, 6) == [f"blocks.{block}.mlp.{layer}" for block in range(3) for layer in ("fc1", "fc2")]
