"""The edit's algebra: keys and values at conv/linear layers, both solvers, the residual correction."""

import copy

import pytest
import torch
from torch import nn

from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses import activation_editing
from lightning_backdoor.defenses.activation_editing import EditProblem, add_delta
from lightning_backdoor.defenses.activations import capture, get_layer
from lightning_backdoor.defenses.editing import closed_form_edit, moment, rank_r_edit, second_moment
from lightning_backdoor.models import build_model
from lightning_backdoor.triggers import BadNets

torch.manual_seed(0)


def split_keys(d=12, n_clean=40, n_trig=6):
    """Clean keys in the first half of the coordinates, triggered keys with a component in the second half."""
    clean = torch.zeros(n_clean, d, dtype=torch.float64)
    clean[:, : d // 2] = torch.randn(n_clean, d // 2, dtype=torch.float64)
    triggered = torch.randn(n_trig, d, dtype=torch.float64)
    return clean, triggered


@pytest.mark.parametrize("solver", ["closed_form", "rank_r"])
def test_triggered_keys_land_on_their_values_and_clean_keys_keep_theirs(solver):
    clean, triggered = split_keys()
    weight = torch.randn(5, 12, dtype=torch.float64)
    values = torch.randn(6, 5, dtype=torch.float64)  # arbitrary new values for the triggered keys
    moment, residual = second_moment(triggered), (values - triggered @ weight.T).T @ triggered / len(triggered)
    if solver == "closed_form":
        delta = closed_form_edit(moment, residual, second_moment(clean), strength=1e-7, ridge=1e-12)
    else:
        delta = rank_r_edit(moment, residual, second_moment(clean), rank=6, strength=1e-7, ridge=1e-12)
    assert torch.allclose(triggered @ (weight + delta).T, values, atol=1e-3)
    assert torch.allclose(clean @ (weight + delta).T, clean @ weight.T, atol=1e-3)


def test_rank_r_edit_has_rank_at_most_r():
    clean, triggered = split_keys(n_trig=8)
    moment, residual = second_moment(triggered), torch.randn(5, 12, dtype=torch.float64)
    delta = rank_r_edit(moment, residual, second_moment(clean), rank=2, strength=0.1)
    assert torch.linalg.matrix_rank(delta).item() <= 2


def test_strength_trades_edit_against_preservation():
    clean, triggered = split_keys()
    clean = clean + 0.3 * torch.randn_like(clean)  # now the two overlap: no edit is free
    moment, residual = second_moment(triggered), torch.randn(4, 12, dtype=torch.float64)
    weak, strong = (closed_form_edit(moment, residual, second_moment(clean), strength) for strength in (10.0, 0.01))
    assert (clean @ weak.T).norm() < (clean @ strong.T).norm()


def test_an_edit_from_bf16_moments_of_rank_deficient_keys_stays_a_small_edit():
    """Fewer keys than the width (one unseen image per class at a wide layer), moments summed from bfloat16
    products: rounding leaves A + λ C + ε I indefinite. The solve adds the smallest jitter that makes it positive
    definite, says so, and the edit still moves the triggered keys towards their values while barely changing the
    clean outputs (solving the indefinite system as it was changed them 2.7x as much as float32 moments do)."""
    from lightning_backdoor.defenses.editing import ledoit_wolf
    generator = torch.Generator().manual_seed(0)
    width, count = 1024, 96
    clean = (torch.rand(2 * count, count, generator=generator) @ torch.randn(count, width, generator=generator)).relu()
    triggered = clean[:count] + 0.5 * torch.rand(count, width, generator=generator)
    weight = torch.randn(32, width, generator=generator) / width ** 0.5
    residual = (clean[:count] - triggered) @ weight.T  # r = v* - W0 k*, the clean value of each triggered key

    def edit(dtype: torch.dtype) -> torch.Tensor:
        keys, trig = clean.to(dtype), triggered.to(dtype)
        preserve = ledoit_wolf(moment(keys, keys) / len(keys), clean.square().sum(1).square().mean(), len(keys))
        return closed_form_edit(moment(trig, trig) / count, moment(residual.to(dtype), trig) / count, preserve, 10.0)

    reference = edit(torch.float32)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        delta = edit(torch.bfloat16)
    assert torch.isfinite(delta).all()
    left = lambda d: ((residual - triggered @ d.T).norm() / residual.norm()).item()  # noqa: E731
    change = lambda d: ((clean @ d.T).norm() / (clean @ weight.T).norm()).item()  # noqa: E731
    assert left(delta) < 0.8  # from 1.0 (float32: 0.35)
    assert change(delta) < 2 * change(reference) + 1e-3  # float32 0.0037, this 0.0059; the indefinite solve 0.0157


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.Conv2d(3, 4, 1),
    nn.Conv2d(3, 4, 5, padding=4, dilation=2), nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
    nn.Conv2d(3, 4, (2, 3), stride=(1, 2), padding=(0, 2), dilation=(3, 1), padding_mode="circular"),
])
def test_conv_keys_times_weight_reproduce_the_output(conv):
    model = nn.Sequential(conv, nn.ReLU())
    images = torch.rand(2, 3, 9, 9)
    acts = capture(model, ["0"], images)["0"]
    assert torch.allclose(acts.keys @ conv.weight.flatten(1).T, acts.values, atol=1e-5)
    expected = conv(images) - (conv.bias.view(1, -1, 1, 1) if conv.bias is not None else 0)
    assert torch.allclose(acts.values, expected.flatten(2).transpose(1, 2), atol=1e-5)


def test_unknown_or_unsupported_layer_names_list_the_valid_ones():
    model = build_model("compact", num_classes=10, in_channels=1, widths=(8, 8, 8))
    with pytest.raises(ValueError, match=r"unknown layer 'blocks\.9'; editable layers: stem\.conv, .*head"):
        get_layer(model, "blocks.9")
    with pytest.raises(ValueError, match="is a BatchNorm2d; supported: nn.Linear and nn.Conv2d"):
        get_layer(model, "blocks.0.norm1")
    with pytest.raises(ValueError, match=r"unknown layer ''; editable layers: stem\.conv"):  # not "is a CompactNet"
        get_layer(model, "")
    linear = nn.Linear(3, 2)
    assert get_layer(linear, "") is linear  # a model that is itself one editable layer


def test_residual_edit_makes_the_block_output_on_triggered_inputs_match_the_clean_one():
    model = build_model("preact_resnet18", num_classes=10, in_channels=3, width=0.125).eval()
    clean_images = torch.rand(4, 3, 16, 16)
    triggered_images = clean_images.clone()
    triggered_images[:, :, -4:, -4:] = 1.0
    layer, block = "layer4.1.conv2", model.get_submodule("layer4.1")
    clean = capture(model, [layer], clean_images)[layer]
    triggered = capture(model, [layer], triggered_images)[layer]
    assert clean.skip is not None  # PreActBlock declares residual_branch = "conv2"
    problem = EditProblem.build(get_layer(model, layer), clean, triggered, torch.ones(4, dtype=torch.long), 0, None)
    add_delta(model, layer, problem.solve("closed_form", strength=1e-4, rank=0))
    outputs = {}
    handle = block.register_forward_hook(lambda m, a, out: outputs.__setitem__("block", out))
    model(triggered_images)
    handle.remove()
    clean_block = clean.values + clean.skip  # conv2 has no bias: values are its whole output
    before = (triggered.values + triggered.skip - clean_block).norm()
    after = (outputs["block"].flatten(2).transpose(1, 2) - clean_block).norm()
    assert after < 0.05 * before


def test_ledoit_wolf_shrinks_few_keys_much_and_many_keys_little():
    from lightning_backdoor.defenses.editing import ledoit_wolf

    scales = torch.linspace(0.2, 3.0, 16, dtype=torch.float64)

    def shrunk(n):
        keys = torch.randn(n, 16, dtype=torch.float64) * scales
        moment = second_moment(keys)
        result = ledoit_wolf(moment, keys.square().sum(1).square().mean(), n)
        # the intensity, recovered from any off-diagonal entry: result = (1 - a) S + a m I
        return moment, result, 1 - result[0, 1] / moment[0, 1]

    few_moment, few, few_intensity = shrunk(8)
    _, _, many_intensity = shrunk(20000)
    assert torch.linalg.matrix_rank(few_moment) == 8 and torch.linalg.matrix_rank(few) == 16
    assert few_intensity > 0.3 and many_intensity < 0.05
    assert torch.allclose(few.trace(), few_moment.trace())


def test_forced_repair_pins_target_keys_and_says_so():
    from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
    from lightning_backdoor.triggers import BadNets

    torch.manual_seed(0)
    model = build_model("compact", num_classes=3, in_channels=1, widths=(8, 8, 8)).eval()
    unseen = UnseenData(torch.rand(12, 1, 16, 16), torch.tensor([0, 1, 2] * 4))
    change = {}
    for weight in (0.0, 1.0, 1e4):
        forced = {"repair_tolerance": -1.0, "repair_weights": (weight,)} if weight > 0 else {"repair": False}
        result = ActivationEditing(layer="head", **forced).defend(copy.deepcopy(model), unseen,
                                                                  BackdoorKnowledge.of(BadNets(), 0))
        assert result.repaired == (weight > 0) and ("after_edit" in result.stages) == (weight > 0)
        info = result.details
        change[weight] = info["diagnostics_after_repair" if weight else "diagnostics"]["clean_output_change"]
        if weight:
            assert info["repair"]["setting"] == weight and info["repair"]["method"] == "pin"
            assert "head.weight" in result.stages["after_edit"]
            assert all(key.startswith("head.") for key in result.stages["after_edit"])
    # pinning the target class's keys harder moves clean outputs less (a third of U is the target class)
    assert change[1e4] < 0.01 * change[0.0] and change[1e4] < change[1.0] < change[0.0]


def _small_problem() -> tuple[nn.Module, UnseenData, BackdoorKnowledge]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    images, labels = torch.rand(24, 3, 8, 8), torch.arange(24) % 4
    return model.eval(), UnseenData(images, labels), BackdoorKnowledge.of(BadNets(size=2), 0)


def test_the_key_statistics_do_not_depend_on_how_the_images_are_chunked():
    model, unseen, knowledge = _small_problem()
    whole, chunked = (ActivationEditing(layer="2", chunk_size=size).fit(model, unseen, knowledge).problem
                      for size in (1000, 5))
    for field in ("triggered_moment", "residual_moment", "clean_moment", "target_moment", "clean_fourth"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), rtol=1e-4, atol=1e-5)
    assert chunked.triggered_count == whole.triggered_count and chunked.clean_count == whole.clean_count


def test_bf16_statistics_stay_close_to_float32_and_the_edit_is_solved_in_float32():
    model, unseen, knowledge = _small_problem()
    exact, rounded = (ActivationEditing(layer="2", bf16=bf16).fit(model, unseen, knowledge).problem
                      for bf16 in (False, True))
    for field in ("triggered_moment", "clean_moment"):
        error = (getattr(rounded, field) - getattr(exact, field)).norm() / getattr(exact, field).norm()
        assert getattr(rounded, field).dtype == torch.float32 and error < 0.03
    assert rounded.solve("closed_form", 10.0, 4).dtype == torch.float32


def test_a_symmetric_moment_mirrors_the_blocks_it_skips():
    keys = torch.randn(50, 13)
    torch.testing.assert_close(moment(keys, keys, blocks=4), keys.T @ keys)
    torch.testing.assert_close(moment(keys, keys.clone()), keys.T @ keys)


def test_captured_keys_are_the_unfolded_input_whatever_its_memory_order():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    images = torch.rand(3, 3, 6, 6)
    for layout in (torch.contiguous_format, torch.channels_last):
        keys = capture(nn.Sequential(conv), ["0"], images.contiguous(memory_format=layout))["0"].keys
        torch.testing.assert_close(keys, nn.functional.unfold(images, 3, padding=1).transpose(1, 2))


def test_the_key_statistics_of_a_subset_are_its_sums():
    model, unseen, knowledge = _small_problem()
    layer = get_layer(model, "2")
    clean = capture(model, ["2"], unseen.images)["2"]
    triggered = capture(model, ["2"], knowledge.triggers[0](unseen.images))["2"]
    subset = torch.arange(len(unseen.labels)) % 3 != 0
    problem = EditProblem.build(layer, clean, triggered, unseen.labels, 0, None, subset)
    non_target, target = subset & (unseen.labels != 0), subset & (unseen.labels == 0)
    keys = triggered.keys[non_target].flatten(0, 1)
    residual = (clean.values[non_target] - triggered.values[non_target]).flatten(0, 1)
    clean_keys = clean.keys[subset].flatten(0, 1)
    target_keys = clean.keys[target].flatten(0, 1)
    torch.testing.assert_close(problem.triggered_moment, keys.T @ keys)
    torch.testing.assert_close(problem.residual_moment, residual.T @ keys)
    torch.testing.assert_close(problem.clean_moment, clean_keys.T @ clean_keys)
    torch.testing.assert_close(problem.target_moment, target_keys.T @ target_keys)
    torch.testing.assert_close(problem.clean_fourth, clean_keys.square().sum(1).square().sum())
    assert problem.clean_count == len(clean_keys) and problem.target_count == len(target_keys)
    assert problem.triggered_count == len(keys)


def test_a_bf16_second_moment_is_the_float32_one_to_bf16_precision():
    keys = torch.randn(300, 40)
    exact = keys.T @ keys
    half = keys.bfloat16()
    rounded = moment(half, half)
    assert rounded.dtype == torch.float32
    assert ((rounded - exact).norm() / exact.norm()).item() < 1e-2


def _wide_linear_problem() -> tuple[nn.Module, UnseenData, BackdoorKnowledge]:
    """A Linear layer reading 512 values per image, and 40 unseen images: far fewer keys than the key width."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 6), nn.ReLU(),
                          nn.Linear(6, 4))
    images, labels = torch.rand(40, 3, 8, 8), torch.arange(40) % 4
    return model.eval(), UnseenData(images, labels), BackdoorKnowledge.of(BadNets(size=2), 0)


def _exact(problem: EditProblem) -> EditProblem:
    """The same problem with float64 moments computed from a factored problem's keys."""
    import dataclasses

    square = lambda rows: rows.rows.double().T @ rows.rows.double()  # noqa: E731
    return dataclasses.replace(
        problem, weight=problem.weight.double(), triggered_moment=square(problem.triggered_moment),
        residual_moment=problem.residual_moment.rows.double().T @ problem.triggered_moment.rows.double(),
        clean_moment=square(problem.clean_moment), target_moment=square(problem.target_moment),
        **{name: getattr(problem, name).double() for name in ("residual_energy", "target_energy", "triggered_count",
                                                               "clean_fourth", "clean_count", "target_count")})


@pytest.mark.parametrize("strength", [0.3, 10.0, 100.0])
def test_the_edit_solved_in_the_span_of_its_keys_is_the_moment_solve(strength):
    model, unseen, knowledge = _wide_linear_problem()
    layer = get_layer(model, "3")
    clean = capture(model, ["3"], unseen.images)["3"]
    triggered = capture(model, ["3"], knowledge.triggers[0](unseen.images))["3"]
    keys = EditProblem.build(layer, clean, triggered, unseen.labels, 0, None, factored=True)
    moments = EditProblem.build(layer, clean, triggered, unseen.labels, 0, None)
    halves = [EditProblem.build(layer, clean, triggered, unseen.labels, 0, None, unseen.labels % 3 == 0, True),
              EditProblem.build(layer, clean, triggered, unseen.labels, 0, None, unseen.labels % 3 != 0, True)]
    assert keys.factored and not moments.factored and len(keys.triggered_moment) == 30  # 10 images per class
    exact = _exact(keys)
    relative = lambda ours, reference: ((ours.double() - reference).norm() / reference.norm()).item()  # noqa: E731
    for pin in (0.0, 4.0, 64.0):  # the repair's pin weights reach the key-space solve too
        reference = exact.solve("closed_form", strength, 4, pin)
        assert reference.dtype == torch.float64
        assert relative(keys.solve("closed_form", strength, 4, pin), reference) < 1e-4
        assert relative((halves[0] + halves[1]).solve("closed_form", strength, 4, pin), reference) < 1e-4
        assert relative(moments.solve("closed_form", strength, 4, pin), reference) < 3e-2  # float32 moments
    delta = exact.solve("closed_form", strength, 4).float()
    for name, value in moments.diagnostics(delta).items():
        assert keys.diagnostics(delta)[name] == pytest.approx(value, rel=1e-3), name
    with pytest.raises(ValueError, match="closed form"):
        keys.solve("rank_r", strength, 4)


def test_the_sum_of_two_solved_problems_reuses_their_gram_matrices():
    """The final edit (both folds) joins the folds' Gram matrices with the products across them: the same keys,
    Gram matrix and edit as computed afresh."""
    model, unseen, knowledge = _wide_linear_problem()
    layer = get_layer(model, "3")
    clean = capture(model, ["3"], unseen.images)["3"]
    triggered = capture(model, ["3"], knowledge.triggers[0](unseen.images))["3"]
    halves = [EditProblem.build(layer, clean, triggered, unseen.labels, 0, None, unseen.labels % 3 == 0, True),
              EditProblem.build(layer, clean, triggered, unseen.labels, 0, None, unseen.labels % 3 != 0, True)]
    fresh = halves[0] + halves[1]  # no Gram matrix known yet: computed when first solved
    for half in halves:
        half.solve("closed_form", 10.0, 4)  # as the cross-validation does
    joined = halves[0] + halves[1]
    assert "_key_space" in vars(joined) and "_key_space" not in vars(fresh)
    (keys, gram), (fresh_keys, fresh_gram) = joined._key_space, fresh._key_space
    assert torch.equal(keys, fresh_keys)
    torch.testing.assert_close(gram, fresh_gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(joined.solve("closed_form", 10.0, 4, 4.0), fresh.solve("closed_form", 10.0, 4, 4.0),
                               rtol=1e-5, atol=1e-7)


def test_the_defense_solves_in_the_span_of_the_keys_only_where_they_are_fewer_than_the_width(monkeypatch):
    from lightning_backdoor.defenses import activation_editing

    model, unseen, knowledge = _wide_linear_problem()
    edited = {}
    for ratio in (1.0, 0.0):  # 0: the moments everywhere
        monkeypatch.setattr(activation_editing, "KEY_SPACE_RATIO", ratio)
        for layer in ("3", "0"):
            copy_ = copy.deepcopy(model)
            result = ActivationEditing(layer=layer, repair_tolerance=-1.0, mirror=False, shift=0).defend(
                copy_, unseen, knowledge)
            edited[ratio, layer] = get_layer(copy_, layer).weight.detach()
            system = result.details["system"]
            if ratio and layer == "3":  # 40 images: 30 triggered, 40 clean, 10 target keys against 512 values
                assert system == {"form": "key_space", "size": 80}
            else:  # the conv reads 64 keys of 27 values per image
                assert system == {"form": "moments", "size": 512 if layer == "3" else 27}
    original = get_layer(model, "3").weight.detach()
    change = edited[0.0, "3"] - original
    assert change.norm() > 0
    assert ((edited[1.0, "3"] - original - change).norm() / change.norm()) < 3e-2
    assert torch.equal(edited[1.0, "0"], edited[0.0, "0"])


def test_the_cgroup_headroom_reads_a_container_limit_of_either_cgroup_version(tmp_path):
    from lightning_backdoor.defenses.activation_editing import cgroup_headroom

    assert cgroup_headroom(tmp_path) is None  # nothing mounted: no limit known
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("1073741824\n")  # cgroup v1: 1 GiB, 256 MiB used
    (v1 / "memory.usage_in_bytes").write_text("268435456\n")
    assert cgroup_headroom(tmp_path) == 768 * 2**20
    (v1 / "memory.stat").write_text("cache 200000000\ntotal_inactive_file 134217728\n")  # 128 MiB reclaimable
    assert cgroup_headroom(tmp_path) == 896 * 2**20
    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2 takes precedence: no limit
    (tmp_path / "memory.current").write_text("5000\n")
    assert cgroup_headroom(tmp_path) is None
    (tmp_path / "memory.max").write_text("4000\n")  # over its limit: nothing left, never negative
    assert cgroup_headroom(tmp_path) == 0
    (tmp_path / "memory.stat").write_text("anon 1000\ninactive_file 3000\n")  # 5000 used, 3000 of it reclaimable
    assert cgroup_headroom(tmp_path) == 2000


def test_a_layer_whose_moments_would_not_fit_in_memory_is_skipped_by_auto_and_refused_by_name(monkeypatch):
    from lightning_backdoor.defenses import activation_editing

    model, unseen, knowledge = _wide_linear_problem()
    # 10 kB free: the conv "0" (27 values, 64 keys per image: moments of 35 kB) does not fit; the Linear "3" (512
    # values, 80 keys from U) is solved in the span of its keys and "5" (6 values) needs 2 kB
    monkeypatch.setattr(activation_editing, "available_memory", lambda: 10_000)
    result = ActivationEditing(layer="auto", strength=None, shift=0).defend(copy.deepcopy(model), unseen,
                                                                             knowledge)
    assert list(result.details["skipped_layers"]) == ["0"] and "GiB is available" in result.details["skipped_layers"]["0"]
    assert result.layer in ("3", "5")
    assert not any(name.startswith("0 ") for name in result.details["selection"]["cross_validated_loss_on_unseen"])
    monkeypatch.setattr(activation_editing, "available_memory", lambda: 1_000_000)  # 1 MB: "3" fits only as keys
    before = get_layer(model, "3").weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '3': its 512 x 512 moments need .*method=closed_form, "
                                         r"repair_method=pin and batchnorm_prior=0"):
        ActivationEditing(layer="3", method="rank_r", shift=0).defend(model, unseen, knowledge)
    assert torch.equal(get_layer(model, "3").weight, before)
    result = ActivationEditing(layer="3", shift=0).defend(copy.deepcopy(model), unseen, knowledge)
    assert result.details["system"]["form"] == "key_space"
    monkeypatch.setattr(activation_editing, "available_memory", lambda: 100)
    with pytest.raises(ValueError, match="no auto candidate's d x d moments fit in memory"):
        ActivationEditing(layer="auto", method="rank_r", shift=0).defend(copy.deepcopy(model), unseen, knowledge)


def test_a_conv_with_two_triggers_and_mask_weights_edits_alike_in_both_forms_and_builds_no_moment(monkeypatch):
    from lightning_backdoor.defenses import activation_editing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    unseen = UnseenData(torch.rand(24, 3, 8, 8), torch.arange(24) % 4)
    knowledge = BackdoorKnowledge.of([BadNets(size=2), BadNets(size=3)], 0)
    defense = ActivationEditing(layer="2", spatial_weight="mask", repair_tolerance=-1.0)  # the pin repair, forced
    edited = {}
    for ratio in (0.0, 1.0):
        monkeypatch.setattr(activation_editing, "KEY_SPACE_RATIO", ratio)
        if ratio:  # the key space: no d x d moment is ever multiplied
            monkeypatch.setattr(activation_editing, "moment", lambda *args, **kwargs: pytest.fail("a moment"))
        copy_ = copy.deepcopy(model)
        result = defense.defend(copy_, unseen, knowledge)
        edited[ratio] = get_layer(copy_, "2").weight.detach()
        # 48 views x 4 positions: 2 triggers x 36 non-target views, 48 clean, 12 target again, against 576 values
        assert result.details["system"] == ({"form": "key_space", "size": 528} if ratio
                                            else {"form": "moments", "size": 576})
        assert result.repaired
    change = edited[0.0] - get_layer(model, "2").weight.detach()
    # measured against float64 moments at the forced pin weight 256: the key space 2.5e-6 apart, the float32 moments
    # 1.4e-2 (an ill-conditioned system); a wrong sign or scale in either form would be of order 1
    assert ((edited[1.0] - edited[0.0]).norm() / change.norm()) < 3e-2


def test_a_prior_is_left_out_or_its_layer_refused_where_its_moments_would_not_fit(monkeypatch):
    from lightning_backdoor.defenses import activation_editing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    unseen = UnseenData(torch.rand(40, 3, 8, 8), torch.arange(40) % 4)
    knowledge = BackdoorKnowledge.of(BadNets(size=2), 0)
    defense = ActivationEditing(layer="4", batchnorm_prior=None, mirror=False, shift=0)
    chosen = defense.defend(copy.deepcopy(model), unseen, knowledge)
    assert chosen.details["system"]["form"] == "moments" and "4" in chosen.details["batchnorm_prior"]["norms"]
    monkeypatch.setattr(activation_editing, "available_memory", lambda: 1_000_000)  # 512 x 512 moments: 12.6 MB
    tight = defense.defend(copy.deepcopy(model), unseen, knowledge)
    assert tight.details["system"] == {"form": "key_space", "size": 80}
    assert tight.details["batchnorm_prior"]["weight"] == 0 and tight.details["batchnorm_prior"]["norms"] == {}
    # a fixed weight: the named layer's moments do not fit, so it is refused in one line before its d x d prior is
    # computed (a 25,088-wide layer's would take 2.5 GB), and the weights are untouched
    monkeypatch.setattr(activation_editing, "batchnorm_key_prior",
                        lambda *args, **kwargs: pytest.fail("the prior of a layer that does not fit was computed"))
    before = get_layer(model, "4").weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '4': its 512 x 512 moments need"):
        ActivationEditing(layer="4", batchnorm_prior=0.5, shift=0).defend(model, unseen, knowledge)
    assert torch.equal(get_layer(model, "4").weight, before)


def test_a_fixed_prior_under_auto_skips_a_layer_that_does_not_fit_before_computing_its_prior(monkeypatch):
    from lightning_backdoor.defenses import activation_editing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    unseen = UnseenData(torch.rand(40, 3, 8, 8), torch.arange(40) % 4)
    knowledge = BackdoorKnowledge.of(BadNets(size=2), 0)
    defense = ActivationEditing(layer="auto", batchnorm_prior=0.5)
    assert defense.candidate_layers(model, unseen.images[:2]) == ["3", "7"]
    real, computed = activation_editing.batchnorm_key_prior, []
    monkeypatch.setattr(activation_editing, "batchnorm_key_prior",
                        lambda network, name, *args, **kwargs: (computed.append(name),
                                                                real(network, name, *args, **kwargs))[1])
    # 1 MB: the conv "3" (72 values: 12 moments of 249 kB) fits, the Linear "7" (512 values: 12.6 MB) does not
    monkeypatch.setattr(activation_editing, "available_memory", lambda: 1_000_000)
    result = defense.defend(copy.deepcopy(model), unseen, knowledge)
    assert computed == ["3"] and list(result.details["skipped_layers"]) == ["7"]
    assert result.layer == "3" and result.details["batchnorm_prior"]["weight"] == 0.5
    assert result.details["system"]["form"] == "moments"  # the prior's layer is never solved without it


def test_the_deepest_layer_within_one_standard_error_of_the_lowest_loss_is_chosen_at_its_own_best_strength():
    from lightning_backdoor.defenses.activation_editing import one_standard_error_choice

    layers = ["conv1", "conv2", "head"]
    scores = {("conv1", 0.0, 1.0): (1.10, 0.05), ("conv1", 0.0, 10.0): (1.12, 0.05),
              ("conv2", 0.0, 1.0): (1.18, 0.05), ("conv2", 0.0, 10.0): (1.14, 0.05),
              ("head", 0.0, 10.0): (1.149, 0.05)}
    # conv2 (1.14) and the head (1.149) are within 1.10 + 0.05; the head is the deepest
    assert one_standard_error_choice(scores, layers) == (("head", 0.0, 10.0), ["conv1", "conv2", "head"])
    scores[("head", 0.0, 10.0)] = (1.149, 0.01)  # its own error does not count: only the lowest's bound
    assert one_standard_error_choice(scores, layers)[0] == ("head", 0.0, 10.0)
    scores[("head", 0.0, 10.0)] = (1.1501, 0.05)  # now outside: conv2 at its own lowest loss (λ = 10, not 1)
    assert one_standard_error_choice(scores, layers) == (("conv2", 0.0, 10.0), ["conv1", "conv2"])
    alone = {("conv2", 0.0, 1.0): (1.18, 0.5), ("conv2", 0.0, 10.0): (1.14, 0.5)}  # one layer: simply the lowest
    assert one_standard_error_choice(alone, layers) == (("conv2", 0.0, 10.0), ["conv2"])


def test_auto_reports_the_rule_and_its_choice_follows_from_the_reported_losses():
    """``layer: auto`` on a small conv net: the report holds every option's loss, the lowest, its standard error
    and the layers within it, and the edited layer is the last of those, at its lowest loss's strength."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    unseen = UnseenData(torch.rand(60, 3, 32, 32), torch.arange(10).repeat(6))
    result = ActivationEditing(layer="auto", strength=None, shift=0, repair=False).defend(
        model, unseen, BackdoorKnowledge.of(BadNets(size=3), 0))
    selection = result.details["selection"]
    losses = selection["cross_validated_loss_on_unseen"]
    assert losses[selection["lowest"]] == min(losses.values()) and selection["standard_error"] > 0
    bound = losses[selection["lowest"]] + selection["standard_error"]
    best = {name: min(value for key, value in losses.items() if key.startswith(f"{name} "))
            for name in dict.fromkeys(key.split(" λ=")[0] for key in losses)}
    within = selection["layers_within_one_standard_error"]  # the report's losses are rounded to 4 places
    assert {name for name, loss in best.items() if loss <= bound - 1e-4} <= set(within)
    assert set(within) <= {name for name, loss in best.items() if loss <= bound + 1e-4}
    assert within == [name for name in best if name in within] and result.layer == within[-1]
    own = {key: value for key, value in losses.items() if key.startswith(f"{result.layer} ")}
    assert own[f"{result.layer} λ={result.details['strength']}"] == min(own.values())


def test_bf16_keys_fewer_than_the_width_are_multiplied_in_float32() -> None:
    """bf16 keys of a layer whose clean keys are fewer than its width (here 1,800 for 2,304): their moments, rounded
    to bfloat16, left the system indefinite (a jitter ladder of d x d factorisations and a weaker edit: on
    PreAct-ResNet18's `layer4.1.conv1` with 10 images per class 0.05 of the mean diagonal, 19 s of factorisations).
    Taken in float32, the system needs no jitter, and the edit leaves the triggered keys where float32 keys do."""
    import warnings

    from lightning_backdoor.defenses.editing import JitterWarning
    from lightning_backdoor.triggers import Blended

    torch.manual_seed(0)
    model = build_model("compact", num_classes=10, in_channels=3).eval()
    labels = torch.arange(10).repeat(20)
    unseen = UnseenData(torch.rand(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(1)), labels)
    left = {}
    for bf16 in (False, True):
        edited = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", JitterWarning)
            result = ActivationEditing(layer="blocks.2.conv2", bf16=bf16, min_images=0).defend(
                edited, unseen, BackdoorKnowledge.of(Blended(), 0))
        assert result.details["system"] == {"form": "moments", "size": 2304}  # the d x d form, not the key space
        left[bf16] = result.details["diagnostics"]["triggered_residual_after"]
    assert left[True] == pytest.approx(left[False], rel=0.02)


def test_the_attack_log_loss_is_minus_log_of_one_minus_the_target_probability() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5], [-3.0, 1.0, 0.0], [80.0, 0.0, 0.0]])
    loss = activation_editing.attack_log_loss(logits, 0)
    assert torch.allclose(loss[:3], -torch.log1p(-logits[:3].softmax(-1)[:, 0]), atol=1e-6)
    assert torch.isfinite(loss[3]) and 79 < loss[3] < 80  # exact where p(target) rounds to 1


@pytest.mark.parametrize("second, scored", [([], "attack_log_loss"), (list(range(10)), "cross_entropy"),
                                            ([1], "mixed")])
def test_triggered_images_of_a_class_the_fit_lacks_are_scored_by_the_attack_log_loss(monkeypatch, second: list,
                                                                                      scored: str) -> None:
    """With one image per class the folds split the classes, and the held-out classes' triggered images are
    scored by whether the attack still succeeds, not by their true label; with two per class, by CE; with a second
    image of one class only, the classes in one fold by the log-loss and that class by CE."""
    # a marker in place of the log-loss: wherever it scores an image, the cross-validated loss shows it
    monkeypatch.setattr(activation_editing, "attack_log_loss", lambda logits, target: torch.full((len(logits),), 1e4))
    torch.manual_seed(0)
    model = build_model("compact", num_classes=10, widths=(8, 16, 16)).eval()
    labels = torch.cat([torch.arange(10), torch.tensor(second, dtype=torch.long)])
    unseen = UnseenData(torch.rand(len(labels), 3, 32, 32), labels)
    knowledge = BackdoorKnowledge.of(BadNets(size=3), 0)
    result = ActivationEditing(layer="auto", repair=False).defend(model, unseen, knowledge)
    assert len(result.details["selection"]["cross_validated_loss_on_unseen"]) > 1
    assert result.details["selection"]["triggered_loss"] == scored
    losses = result.details["selection"]["cross_validated_loss_on_unseen"].values()
    assert all((loss > 100) == (scored != "cross_entropy") for loss in losses), losses
