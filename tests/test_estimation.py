"""Defending without backdoor knowledge: the anomaly index, target estimation on a backdoored model, a clean model
left unchanged, and bad input."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_backdoor.cli import main
from lightning_backdoor.runs import instantiate_run
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, EstimateFirst, UnseenData
from lightning_backdoor.defenses.callback import DefenseCallback
from lightning_backdoor.defenses.activations import get_layer
from lightning_backdoor.defenses.estimation import (BackdoorEstimate, TriggerEstimator, anomaly_index, feature_layer,
                                                   flaggable_index, inversion_generator, size_anomaly_index)
from lightning_backdoor.defenses.inversion import (INVERSIONS, BlendInversion, FeatureInversion, FeatureTrigger,
                                                  MaskPatternTrigger, PerturbationTrigger, WarpInversion)
from lightning_backdoor.models import CompactNet
from lightning_backdoor.triggers import build_trigger
from lightning_backdoor.io import load_state_dict

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")



def knows(trigger, target_class: int = 0) -> BackdoorKnowledge:
    return BackdoorKnowledge.of(trigger, target_class)

def test_anomaly_index_matches_hand_computation() -> None:
    # median of [1, 10, 11, 12, 13, 14] is 11.5; |x - 11.5| = [10.5, 1.5, .5, .5, 1.5, 2.5], median 1.5
    index = anomaly_index(torch.tensor([1.0, 10.0, 11.0, 12.0, 13.0, 14.0]))
    mad = 1.4826 * 1.5
    expected = [10.5 / mad, 1.5 / mad, 0.5 / mad, -0.5 / mad, -1.5 / mad, -2.5 / mad]
    assert index.tolist() == pytest.approx(expected)
    assert index[0] == pytest.approx(4.72141, abs=1e-4)  # the one outlier: index > 2 on the small side


def test_anomaly_index_with_zero_deviation() -> None:
    index = anomaly_index(torch.tensor([5.0, 5.0, 5.0, 1.0, 9.0]))
    assert index.tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf]


def test_only_a_trigger_far_below_the_median_can_be_flagged() -> None:
    # sizes are scored on the log scale; log sizes (natural log) of a tight spread around e^2.4:
    # [1.8, 2.3, 2.35, 2.4, 2.45, 2.5, 2.6]: median 2.4, |deviations| [.6, .1, .05, 0, .05, .1, .2], MAD 0.1
    tight = torch.tensor([1.8, 2.3, 2.35, 2.4, 2.45, 2.5, 2.6], dtype=torch.float64).exp()
    assert size_anomaly_index(tight)[0].item() == pytest.approx(0.6 / (1.4826 * 0.1))
    # an outlier by MAD (index 4.05) yet e^-0.6 = 55 % of the median class's trigger, as natural classes differ
    assert flaggable_index(tight, 0.3)[0] == -math.inf and flaggable_index(tight, 0.6)[0] > 4
    small = tight.clone()
    small[0] = math.exp(2.4 - 2.0)  # 13.5 % of the median: index 2.0 / (1.4826 * 0.1) = 13.5
    assert flaggable_index(small, 0.3)[0].item() == pytest.approx(2.0 / (1.4826 * 0.1))
    assert (flaggable_index(small, 0.3)[1:] == -math.inf).all()


def test_a_wide_upper_side_does_not_hide_a_small_trigger() -> None:
    # Blended, unseen seed 1, Neural Cleanse: a trigger at 9 % of the median, but classes up to 10.6 times it
    sizes = torch.tensor([0.09, 0.50, 0.64, 5.80, 1.02, 10.59, 0.98, 0.88, 4.23, 1.21])
    assert anomaly_index(sizes)[0] < 2  # on the linear scale the big classes inflate the MAD: missed
    assert size_anomaly_index(sizes)[0] > 2 and int(flaggable_index(sizes, 0.3).argmax()) == 0
    assert torch.equal(size_anomaly_index(sizes, log_scale=False), anomaly_index(sizes))  # Neural Cleanse's own
    assert flaggable_index(sizes, 0.3, log_scale=False).max() < 2


def test_estimation_finds_the_target_and_removes_the_backdoor(quickstart_run: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    module, data = instantiate_run([QUICKSTART], quickstart_run / "checkpoints" / "poisoned.ckpt")
    callback = DefenseCallback(trigger_known=False)
    with caplog.at_level(logging.INFO):
        report = callback.defend(module, data, [], tmp_path).to_json()
    assert "defense: estimating the trigger, then editing on 100 unseen images" in caplog.text
    estimation = report["defense"]["estimation"]
    assert estimation["backdoor_found"] and estimation["target_class"] == data.target_class == 0
    indices = estimation["anomaly_index"][estimation["estimator"]]
    assert len(indices) == data.num_classes and max(indices) == indices[0] > 2
    assert report["after"]["asr"] < 0.2 < 0.9 < report["before"]["asr"]
    assert report["after"]["clean_acc"] > report["before"]["clean_acc"] - 0.02
    # the candidates of the estimators that flag class 0 (index > 2, size ratio <= 0.3), largest index first, at
    # strengths 1 and 1.5; Neural Cleanse's also moved
    flagging = [name for name in estimation["anomaly_index"] if estimation["anomaly_index"][name][0] > 2
                and estimation["size_ratio"][name][0] <= 0.3]
    flagging.sort(key=lambda name: -estimation["anomaly_index"][name][0])
    assert estimation["flagged_by"] == flagging and flagging[0] == estimation["estimator"]
    moved = {"neural_cleanse": " (and moved 8 px each way where that acts: see placements)"}
    assert estimation["edited_with"] == [f"{name} x{strength}{moved.get(name, '')}" for name in flagging
                                         for strength in ("1", "1.5")]
    written = json.loads(callback.report_path.read_text())
    assert Path(written["defense"]["estimated_trigger"]).is_file()
    assert {"estimation_seconds", "editing_seconds"} <= set(written["defense"])


def test_clean_model_is_left_unchanged(clean_quickstart_run: Path, tmp_path: Path) -> None:
    checkpoint = clean_quickstart_run / "checkpoints" / "poisoned.ckpt"
    main(["defend", "--config", QUICKSTART, "--checkpoint", str(checkpoint), "--trigger_known", "false",
          "--output_dir", str(tmp_path), "--trainer.logger=false", "--data.init_args.poison_rate=0"])
    report = json.loads((tmp_path / "defense_report.json").read_text())
    assert report["defense"]["estimation"]["backdoor_found"] is False
    assert report["defense"]["method"] == "editing/no_backdoor_found"
    original, defended = load_state_dict(checkpoint), load_file(tmp_path / "defended.safetensors")
    weights = [key for key in original if key.startswith("net.")]
    assert weights and all(torch.equal(defended[key], original[key]) for key in weights)
    assert report["after"]["clean_acc"] == report["before"]["clean_acc"]


def test_an_inversion_gives_the_same_result_alone_and_after_others() -> None:
    """Every inversion draws its start and batches from its own stream of ``seed``: the feature inversion run alone
    (``estimators: [feature]``) gives the figures it gives after three others; no two inversions share a stream."""
    torch.manual_seed(0)
    model = CompactNet(num_classes=4, in_channels=1, widths=(8, 8, 8)).eval()
    unseen = UnseenData(torch.rand(20, 1, 12, 12), torch.arange(4).repeat(5))
    settings = {"max_steps": 6, "progress": False, "seed": 3}
    together = TriggerEstimator(estimators=("neural_cleanse", "perturbation", "warp", "feature"),
                                **settings).estimate(model, unseen).details
    alone = TriggerEstimator(estimators=("feature",), **settings).estimate(model, unseen).details
    for record in ("trigger_size", "anomaly_index", "inversion_success", "fully_inverted"):
        assert alone[record]["feature"] == together[record]["feature"], record
    other_seed = TriggerEstimator(estimators=("feature",), **(settings | {"seed": 4})).estimate(model, unseen).details
    assert other_seed["trigger_size"]["feature"] != alone["trigger_size"]["feature"]  # the seed does reach it
    seeds = {inversion_generator(3, name).initial_seed() for name in INVERSIONS}
    assert len(seeds) == len(INVERSIONS) and inversion_generator(3, "neural_cleanse").initial_seed() == 3
    assert inversion_generator(2 ** 63 - 1, "feature").initial_seed() < 2 ** 64  # the largest seed has streams too


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.5, True])
def test_the_edit_refuses_a_seed_the_estimation_could_not_take(seed) -> None:
    with pytest.raises(ValueError, match=r"must be an integer in \[0, 2\*\*63\)") as error:
        ActivationEditing(seed=seed)
    assert "\n" not in str(error.value)


def test_a_model_with_one_output_class_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1))
    unseen = UnseenData(torch.rand(10, 1, 28, 28), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 3 output classes .*; this model has 1$"):
        EstimateFirst(ActivationEditing()).defend(model, unseen, None)


def test_too_few_unseen_images_per_class_are_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    labels = torch.arange(10).repeat(2)
    with pytest.raises(ValueError, match="at least 5 unseen images of every class; class 0 has 2"):
        TriggerEstimator().estimate(model, UnseenData(torch.rand(20, 1, 28, 28), labels))


def _conv_input(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = get_layer(model, layer).register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen[0]


def test_feature_trigger_rewrites_the_layer_input_only_while_attached() -> None:
    torch.manual_seed(0)
    model = CompactNet(num_classes=10, in_channels=1).eval()
    images = torch.rand(4, 1, 28, 28)
    clean = _conv_input(model, "blocks.2.conv2", images)
    mask = torch.zeros(clean.shape[1], 1, 1)
    mask[:3] = 1.0
    pattern = torch.full(clean.shape[1:], 7.0)
    trigger = FeatureTrigger("blocks.2.conv2", mask, pattern)
    assert torch.equal(trigger(images), images)  # nothing happens in image space
    with trigger.attached(model):
        stamped = _conv_input(model, "blocks.2.conv2", images)
    assert torch.equal(stamped[:, :3], torch.full_like(stamped[:, :3], 7.0))
    assert torch.equal(stamped[:, 3:], clean[:, 3:])
    assert torch.equal(_conv_input(model, "blocks.2.conv2", images), clean)  # the hook is gone afterwards


def test_feature_inversion_bounds_its_pattern_by_the_channel_maxima_on_unseen_images() -> None:
    torch.manual_seed(0)
    model = CompactNet(num_classes=10, in_channels=1).eval()
    images = torch.rand(20, 1, 28, 28)
    inversion = FeatureInversion.create(model, images, 10, torch.Generator().manual_seed(0), "blocks.2.conv2")
    features = _conv_input(model, "blocks.2.conv2", images)
    channel_max = features.amax(dim=(0, 2, 3)).clamp(min=1e-6)
    assert (inversion.pattern() <= channel_max[None, :, None, None] + 1e-6).all()
    assert inversion.sizes().tolist() == pytest.approx([features.shape[1] / 2] * 10)  # half of every channel
    linear = FeatureInversion.create(model, images, 10, torch.Generator().manual_seed(0), "head")  # (N, C) input
    assert linear.mask_logit.shape == (10, model.head.in_features) and linear.apply(images).shape == (10, 20, 1, 28, 28)


def test_blend_inversion_is_neural_cleanse_with_one_opacity_per_class() -> None:
    inversion = BlendInversion(10, (3, 8, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        inversion.mask_logit[3] = math.log(0.2 / 0.8)  # opacity 0.2
    assert inversion.sizes()[3].item() == pytest.approx(0.2 * 64)  # the L1 norm of a uniform 0.2 mask
    assert inversion.sizes()[0].item() == pytest.approx(0.5 * 64)
    images = torch.rand(5, 3, 8, 8)
    trigger = inversion.trigger(3)
    pattern = inversion.pattern_logit[3].sigmoid().detach()
    assert torch.allclose(trigger(images), 0.8 * images + 0.2 * pattern, atol=1e-6)
    assert torch.allclose(inversion.apply(images)[3].detach(), trigger(images), atol=1e-6)
    assert torch.allclose(trigger.mask((3, 8, 8)), torch.full((1, 8, 8), 0.2))


def test_warp_inversion_shifts_pixels_by_its_displacement_field() -> None:
    inversion = WarpInversion(10, (3, 8, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        inversion.control.zero_()
        inversion.control[4, 0] = 1.0  # class 4: every pixel reads its right-hand neighbour (x + 1 pixel)
        inversion.control[5, 1] = -0.5  # class 5: half a pixel up
    assert inversion.sizes()[[0, 4, 5]].tolist() == pytest.approx([0.0, 1.0, 0.5])  # mean shift, pixels
    images = torch.rand(6, 3, 8, 8)
    warped = inversion.apply(images).detach()
    assert warped.shape == (10, 6, 3, 8, 8)
    torch.testing.assert_close(warped[0], images)  # no displacement: unchanged
    torch.testing.assert_close(warped[4][..., :-1], images[..., 1:])  # one pixel left (the border column repeats)
    torch.testing.assert_close(warped[5][..., 1:, :], 0.5 * (images[..., :-1, :] + images[..., 1:, :]))
    trigger = inversion.trigger(4)
    torch.testing.assert_close(trigger(images), warped[4])
    torch.testing.assert_close(trigger.strengthened(2.0)(images)[..., :-2], images[..., 2:])  # two pixels
    picture = trigger.picture()
    assert picture.shape == (3, 8, 8) and picture[0].min() == 1.0 and (picture[1:] == 0.5).all()


def test_a_strengthened_candidate_scales_its_mask_or_perturbation() -> None:
    images = torch.rand(4, 3, 8, 8)
    mask, pattern = torch.full((1, 8, 8), 0.4), torch.rand(3, 8, 8)
    stronger = MaskPatternTrigger(mask, pattern).strengthened(2.0)
    assert torch.allclose(stronger(images), 0.2 * images + 0.8 * pattern, atol=1e-6)
    assert MaskPatternTrigger(mask, pattern).strengthened(3.0).mask((3, 8, 8)).max() == 1.0  # clipped: opaque
    delta = 0.1 * torch.randn(3, 8, 8)
    assert torch.allclose(PerturbationTrigger(delta).strengthened(1.5)(images), (images + 1.5 * delta).clamp(0, 1))
    feature = FeatureTrigger("head", torch.tensor([0.5, 0.9]), torch.ones(2)).strengthened(1.5)
    assert feature._mask.tolist() == pytest.approx([0.75, 1.0])
    with pytest.raises(ValueError, match="strengths=.*>= 1"):
        TriggerEstimator(strengths=(0.5, 1.0))


def test_the_edit_also_maps_patch_candidates_moved_each_way() -> None:
    mask = torch.zeros(1, 32, 32)
    mask[0, 30, 18] = 0.5  # where unseen seed 2's Neural Cleanse candidate sat on the CIFAR-10 BadNets model
    patch, delta = MaskPatternTrigger(mask, torch.rand(3, 32, 32)), 0.1 * torch.randn(3, 32, 32)
    estimate = BackdoorEstimate(0, patch, "neural_cleanse", 1.0, candidates={"neural_cleanse": patch,
                                "perturbation": PerturbationTrigger(delta)}, strengths=(1.0, 1.5), shift=8)
    triggers = estimate.edit_triggers()
    assert len(triggers) == 2 * (1 + 4) + 2  # the patch at two strengths, each in place and moved 4 ways
    peaks = [(divmod(int(trigger._mask.argmax()), 32), trigger._mask.max().item()) for trigger in triggers[:10]]
    assert peaks[:5] == [((30, 18), 0.5), ((30, 26), 0.5), ((30, 10), 0.5), ((6, 18), 0.5), ((22, 18), 0.5)]
    assert [peak for peak, _ in peaks[5:]] == [peak for peak, _ in peaks[:5]] and peaks[5][1] == 0.75
    assert torch.equal(triggers[10]._delta, delta) and torch.allclose(triggers[11]._delta, 1.5 * delta)
    moved = " (and moved 8 px each way where that acts: see placements)"
    assert estimate.report()["edited_with"] == [f"neural_cleanse x1{moved}", f"neural_cleanse x1.5{moved}",
                                                "perturbation x1", "perturbation x1.5"]
    assert len(BackdoorEstimate(0, patch, "neural_cleanse", 1.0, candidates={"neural_cleanse": patch},
                                shift=0).edit_triggers()) == 1
    with pytest.raises(ValueError, match="shift=-1 must be >= 0"):
        TriggerEstimator(shift=-1)


def test_moved_patch_candidates_the_model_does_not_react_to_are_left_out() -> None:
    mask = torch.zeros(1, 32, 32)
    mask[0, 30, 18] = 0.5
    patch = MaskPatternTrigger(mask, torch.rand(3, 32, 32))
    estimate = BackdoorEstimate(0, patch, "neural_cleanse", 1.0, candidates={"neural_cleanse": patch},
                                strengths=(1.0, 1.5), shift=8)
    # a stand-in success: the candidate in place sends 80 % of U to the target (90 % at x1.5), moved right 60 %,
    # moved elsewhere 10 %
    def success(trigger: MaskPatternTrigger) -> float:
        row, column = divmod(int(trigger._mask.argmax()), 32)
        place = 0.8 if (row, column) == (30, 18) else 0.6 if (row, column) == (30, 26) else 0.1
        return place + (0.1 if trigger._mask.max() > 0.5 else 0.0)

    def places(triggers: list) -> list[tuple[int, int]]:
        return [divmod(int(trigger._mask.argmax()), 32) for trigger in triggers]

    assert places(estimate.edit_triggers(success, keep=0.5)) == [(30, 18), (30, 26)] * 2  # 0.6 >= 0.4, 0.7 >= 0.45
    # keep 0.76: at x1 the move sends 0.6 < 0.608 (left out), at x1.5 0.7 >= 0.684 (kept)
    assert places(estimate.edit_triggers(success, keep=0.76)) == [(30, 18), (30, 18), (30, 26)]
    assert len(estimate.edit_triggers(success, keep=0.0)) == len(estimate.edit_triggers()) == 10


def test_editing_with_a_repeated_trigger_equals_editing_with_it_once(quickstart_run: Path) -> None:
    module, data = instantiate_run([QUICKSTART], quickstart_run / "checkpoints" / "poisoned.ckpt")
    unseen_set = data.unseen_set(5, 0)
    unseen = UnseenData(unseen_set.images.float() / 255, unseen_set.labels)
    edits = []
    for triggers in (data.trigger, [data.trigger, data.trigger]):
        model = module.net.float().eval()
        model.load_state_dict(module.net.state_dict())
        edited = copy.deepcopy(model)
        # shift=0: the moves of each copy would join in another order, changing the sums' rounding (4e-6)
        ActivationEditing(layer="blocks.2.conv1", shift=0).defend(edited, unseen,
                                                                  BackdoorKnowledge.of(triggers, data.target_class))
        edits.append(edited.blocks[2].conv1.weight - model.blocks[2].conv1.weight)
    assert edits[0].abs().max() > 0
    torch.testing.assert_close(edits[1], edits[0], rtol=1e-4, atol=1e-6)  # the key statistics add, then normalise


def test_a_feature_trigger_edits_its_layer_or_a_later_one() -> None:
    model = CompactNet(num_classes=10, in_channels=1).eval()
    unseen = UnseenData(torch.rand(20, 1, 28, 28), torch.arange(10).repeat(2))
    assert feature_layer(model) == feature_layer(model, "blocks.2.conv2") == "blocks.2.conv1"  # a block below
    assert feature_layer(model, "stem.conv") == "stem.conv"  # no convolution before it: its own input
    features = _conv_input(model, "blocks.2.conv1", unseen.images[:1])
    trigger = FeatureTrigger("blocks.2.conv1", torch.ones(features.shape[1], 1, 1), torch.ones(features.shape[1:]))
    with pytest.raises(ValueError, match=r"the trigger acts at the input of 'blocks.2.conv1', after the edit's layer "
                                         r"'blocks.1.conv2'; edit 'blocks.2.conv1' or a later layer"):
        ActivationEditing(layer="blocks.1.conv2").defend(model, unseen, knows([build_trigger("badnets"), trigger]))
    before = {name: layer.weight.clone() for name, layer in model.named_modules() if name.startswith("blocks.2.")
              and isinstance(layer, nn.Conv2d)}
    result = ActivationEditing(layer="blocks.2.conv2", repair=False).defend(model, unseen, knows(trigger))
    assert result.layer == "blocks.2.conv2"
    assert not torch.equal(model.blocks[2].conv2.weight, before["blocks.2.conv2"])
    assert torch.equal(model.blocks[2].conv1.weight, before["blocks.2.conv1"])
    # auto tries the candidate layers (the last three: blocks.2.conv1, blocks.2.conv2, head) after the stamped one
    info = ActivationEditing(layer="auto", repair=False).defend(copy.deepcopy(model), unseen, knows(trigger)).details
    assert sorted(info["selection"]["cross_validated_loss_on_unseen"]) == ["blocks.2.conv2 λ=10.0", "head λ=10.0"]
    last = FeatureTrigger("head", torch.ones(256), torch.ones(256))
    result = ActivationEditing(layer="auto", repair=False).defend(copy.deepcopy(model), unseen, knows(last))
    assert result.layer == "head" and "selection" not in result.details  # nothing after it: the stamped layer itself
    with pytest.raises(ValueError, match=r"act at several layers \['blocks.2.conv1', 'head'\]; one edit needs them"):
        ActivationEditing(layer="auto").defend(copy.deepcopy(model), unseen, knows([trigger, last]))


def test_the_feature_inversion_acts_before_every_auto_candidate() -> None:
    """Where ``auto`` adds candidates before the convolution the feature inversion would use (a MobileNet's corrected
    project convs behind its pooled head), the inversion moves before all of them, to a convolution whose output no
    skip path bypasses and that reads more than one position; elsewhere it stays one convolution below the last."""
    from lightning_backdoor.defenses.activations import auto_candidates
    from lightning_backdoor.models.registry import build_model

    images = torch.rand(1, 3, 32, 32)
    mobilenet = build_model("torchvision:mobilenet_v3_small", 10, stem_stride=1).eval()
    candidates = auto_candidates(mobilenet, 3, images)
    assert candidates[:2] == ["features.10.block.3.0", "features.11.block.3.0"]
    assert feature_layer(mobilenet) == "features.11.block.3.0"  # after the first candidate: it would miss it
    assert feature_layer(mobilenet, "auto", candidates, images) == "features.9.block.3.0"  # block 9 has no skip path
    assert feature_layer(mobilenet, "features.12.0", candidates, images) == "features.11.block.3.0"  # a named layer
    compact = CompactNet(num_classes=10, in_channels=3).eval()
    assert feature_layer(compact, "auto", auto_candidates(compact, 3, images), images) == feature_layer(compact)
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1),
                           nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4, 10)).eval()
    assert feature_layer(pooled) == "4"
    assert feature_layer(pooled, "auto", ["3", "5", "7"]) == "2"  # unprobed: the last convolution before "3"
    assert feature_layer(pooled, "auto", ["3", "5", "7"], images) == "0"  # "2" reads one pooled position
    seen = {}

    class Recording(TriggerEstimator):
        def estimate(self, model, unseen, layer="auto", candidates=None):
            seen.update(layer=layer, candidates=candidates)
            return BackdoorEstimate(None, None, None, 0.0, {})

    unseen = UnseenData(torch.rand(20, 3, 32, 32), torch.arange(10).repeat(2))
    EstimateFirst(ActivationEditing(), Recording()).defend(mobilenet, unseen, None)
    assert seen == {"layer": "auto", "candidates": candidates}  # the layers the edit will choose from
    EstimateFirst(ActivationEditing(layer="features.12.0"), Recording()).defend(mobilenet, unseen, None)
    assert seen == {"layer": "features.12.0", "candidates": None}
