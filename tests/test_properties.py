"""Property-based tests (hypothesis): triggers, poisoning plans, the edit's invariants, and a fuzz of the CLI's
config values (bad values only ever end in our one-line error with exit code 2)."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_backdoor.cli import main
from lightning_backdoor.data.poisoning import plan_splits
from lightning_backdoor.defenses.editing import closed_form_edit, rank_r_edit, second_moment
from lightning_backdoor.triggers import SIG, BadNets, Blended, WaNet

FAST = settings(max_examples=25, deadline=None)

shapes = st.tuples(st.sampled_from([1, 3]), st.integers(8, 20), st.integers(8, 20))


def images_of(shape: tuple[int, int, int], seed: int, count: int = 3) -> torch.Tensor:
    return torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def badnets_on_shape(draw: st.DrawFn) -> tuple[BadNets, tuple[int, int, int]]:
    shape = draw(shapes)
    size = draw(st.integers(1, min(shape[1:])))
    position = draw(st.one_of(st.sampled_from(["bottom_right", "top_left", "top_right", "bottom_left", "center"]),
                              st.tuples(st.integers(0, shape[1] - size), st.integers(0, shape[2] - size))))
    return BadNets(size=size, position=position, value=draw(st.floats(0, 1))), shape


@FAST
@given(badnets_on_shape(), st.integers(0, 2**16))
def test_badnets_acts_only_inside_its_mask_and_is_idempotent(trigger_and_shape, seed):
    trigger, shape = trigger_and_shape
    images = images_of(shape, seed)
    original = images.clone()
    triggered = trigger(images)
    mask = trigger.mask(shape).bool().expand(shape)
    assert torch.equal(images, original)  # the input is not changed in place
    assert triggered.shape == images.shape and triggered.dtype == images.dtype
    assert torch.equal(triggered[:, ~mask], images[:, ~mask])
    assert torch.all(triggered[:, mask] == trigger.value)
    assert torch.equal(trigger(triggered), triggered)


@FAST
@given(shapes, st.integers(0, 2**16), st.sampled_from(["blended", "sig", "wanet"]), st.floats(0.05, 1.0))
def test_global_triggers_stay_in_range_and_treat_each_image_alone(shape, seed, name, strength):
    trigger = {"blended": lambda: Blended(alpha=strength, seed=seed), "sig": lambda: SIG(delta=strength),
               "wanet": lambda: WaNet(k=min(4, shape[1]), s=strength, seed=seed)}[name]()
    images = images_of(shape, seed)
    triggered = trigger(images)
    assert triggered.shape == images.shape and triggered.dtype == images.dtype
    assert triggered.min() >= 0.0 and triggered.max() <= 1.0
    assert trigger.mask(shape) is None  # global: no mask to be consistent with
    one_by_one = torch.cat([trigger(image[None]) for image in images])
    torch.testing.assert_close(triggered, one_by_one)


@FAST
@given(shapes, st.integers(0, 2**16))
def test_opaque_blend_is_its_pattern(shape, seed):
    trigger = Blended(alpha=1.0, seed=seed)
    first, second = trigger(images_of(shape, seed)), trigger(images_of(shape, seed + 1))
    torch.testing.assert_close(first, second)


@FAST
@given(st.integers(2, 5), st.integers(0, 4), st.floats(0.0, 0.5), st.integers(0, 2**16), st.booleans(),
       st.integers(60, 200))
def test_poisoning_plans_are_disjoint_and_respect_the_rate(num_classes, unseen_per_class, rate, seed, clean_label,
                                                          size):
    labels = torch.randint(0, num_classes, (size,), generator=torch.Generator().manual_seed(seed))
    target = seed % num_classes
    try:
        plan = plan_splits(labels, num_classes, target, rate, unseen_per_class, 0.1, clean_label, 0.5, seed)
    except ValueError as error:  # an impossible plan says why, on one line
        assert "\n" not in str(error)
        return
    unseen, val, train = set(plan.unseen.tolist()), set(plan.val.tolist()), set(plan.train.tolist())
    assert not (unseen & val) and not (unseen & train) and not (val & train)
    assert len(unseen) + len(val) + len(train) == size
    assert len(plan.unseen) == unseen_per_class * num_classes
    assert torch.equal(labels[plan.unseen].view(unseen_per_class, num_classes),
                       torch.arange(num_classes).expand(unseen_per_class, num_classes))
    poisoned = set(plan.poisoned.tolist())
    assert poisoned <= train and len(plan.poisoned) == round(rate * len(train))
    assert torch.all((labels[plan.poisoned] == target) == clean_label)
    assert set(plan.noise.tolist()) <= train - poisoned


@st.composite
def edit_problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Clean keys in the first ``half`` coordinates, triggered keys in the rest: (clean, triggered, residual R)."""
    d, c_out, seed = draw(st.integers(4, 12)), draw(st.integers(1, 6)), draw(st.integers(0, 2**16))
    half = d // 2
    generator = torch.Generator().manual_seed(seed)
    clean = torch.zeros(64, d, dtype=torch.float64)
    clean[:, :half] = torch.randn(64, half, generator=generator, dtype=torch.float64)
    triggered = torch.zeros(32, d, dtype=torch.float64)
    triggered[:, half:] = torch.randn(32, d - half, generator=generator, dtype=torch.float64)
    residual = torch.randn(c_out, 32, generator=generator, dtype=torch.float64) @ triggered / 32
    return clean, triggered, residual, half


@FAST
@given(edit_problems(), st.floats(0.1, 100.0), st.sampled_from(["closed_form", "rank_r"]))
def test_edit_invariants(problem, strength, method):
    clean, triggered, residual, half = problem
    moment, preserve = second_moment(triggered), second_moment(clean)

    def solve(r: torch.Tensor) -> torch.Tensor:
        if method == "closed_form":
            return closed_form_edit(moment, r, preserve, strength)
        return rank_r_edit(moment, r, preserve, rank=clean.shape[1] - half, strength=strength)

    delta = solve(residual)
    assert torch.count_nonzero(solve(torch.zeros_like(residual))) == 0  # nothing to correct, nothing changes
    torch.testing.assert_close(solve(3.0 * residual), 3.0 * delta)  # linear in the residual
    # clean keys span directions the triggered keys never visit: the edit leaves them (almost) unmoved
    assert (clean @ delta.T).norm() <= 1e-6 * (1 + (triggered @ delta.T).norm())


BAD_VALUES = {
    "--data.init_args.poison_rate": st.one_of(st.floats(1.0001, 1e6), st.floats(-1e6, -1e-4),
                                              st.just("nan"), st.text("abc[]{}:,", min_size=1, max_size=5)),
    "--data.init_args.target_class": st.one_of(st.integers(10, 10**9), st.integers(-10**9, -1),
                                               st.sampled_from(["1.5", "x", "[]", "{}"])),
    "--data.init_args.unseen_per_class": st.one_of(st.integers(400, 10**7), st.integers(-10**6, -1),
                                                   st.sampled_from(["2.5", "many", "[1]"])),
    "--data.init_args.trigger.init_args.size": st.one_of(st.integers(29, 10**6), st.integers(-10**6, 0),
                                                         st.sampled_from(["big", "3.5"])),
    "--data.init_args.trigger.init_args.value": st.one_of(st.floats(1.0001, 1e3), st.floats(-1e3, -1e-3)),
    "--data.init_args.val_fraction": st.one_of(st.floats(1.0, 1e3), st.floats(-1e3, -1e-3)),
    "--data.init_args.source": st.text("xyz_:/", min_size=1, max_size=8),
    "--model.init_args.model": st.text("xyz_", min_size=1, max_size=8),
    "--data.init_args.trigger": st.text("abcxyz.", min_size=1, max_size=12),
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda key: st.tuples(st.just(key), BAD_VALUES[key])))
def test_bad_config_values_only_ever_give_our_one_line_error(key_and_value):
    key, value = key_and_value
    assume(str(value).strip() and "\n" not in str(value))
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        stderr = io.StringIO()
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr):
            main(["fit", "--config", "configs/quickstart.yaml", "--trainer.logger=false",
                  f"--trainer.default_root_dir={run}", f"{key}={value}"])
        assert exit_info.value.code == 2
        lines = stderr.getvalue().strip().splitlines()
        assert lines and lines[-1].startswith("lightning-backdoor: error: ") and "Traceback" not in stderr.getvalue()
        assert not run.exists()
