"""The Input-Aware Dynamic trigger (Nguyen & Tran, NeurIPS 2020): a pattern and a mask generated for each image.

It keeps shape, dtype and the [0, 1] range on grey and colour images of any size, gives each image its own trigger,
refuses to run unprepared or all-to-all, prepares the same generators for a seed and caches them, carries another
image's trigger in its noise (cross) mode, and is learned by a small model on the bundled ``digits``. The helpers
and the learning check's victim are those of the other triggers made with a model (``test_prepared_triggers.py``)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from test_prepared_triggers import said  # noqa: F401  (a fixture: the preparations' log lines)
from test_prepared_triggers import (SURROGATE, clean_model, digits, few_digits, images_of, same_tensors, scores,
                                    tensors_of, trained)
from torch import Tensor

from lightning_backdoor.triggers import TRIGGERS, InputAware, PreparedTrigger, build_trigger
from lightning_backdoor.triggers.input_aware import mask_of, paste, pattern_of

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

#: Small enough for a test: narrow generators and surrogate on 8 x 8 digits, about a second to prepare.
QUICK = {"widths": (8, 16, 16), "mask_epochs": 2, "batch_size": 64} | SURROGATE


def quick(**overrides: object) -> InputAware:
    return build_trigger("input_aware", **(QUICK | overrides))  # type: ignore[return-value]


@functools.cache
def prepared(seed: int = 0) -> InputAware:
    """Prepared on the first 300 training digits (target 0), once per seed and test process."""
    trigger = quick(seed=seed)
    trigger.prepare(*few_digits(), 0, 10)
    return trigger


@functools.cache
def prepared_in_colour() -> InputAware:
    """Prepared on 96 random colour images of 12 x 12 (4 classes), the briefest settings: a shape check only."""
    images = (images_of(96, 3, 12, 12, seed=20) * 255).round().to(torch.uint8)
    trigger = quick(mask_epochs=1, surrogate_epochs=1, batch_size=32)
    trigger.prepare(images, torch.arange(96) % 4, 1, 4)
    return trigger


def parts(trigger: InputAware, images: Tensor) -> tuple[Tensor, Tensor]:
    """The prepared generators' pattern ``(N, C, H, W)`` and mask ``(N, 1, H, W)`` for ``images``."""
    pattern_net, mask_net = trigger.networks(images.shape[1], images.device, images.dtype)
    return pattern_of(pattern_net, images), mask_of(mask_net, images)


def test_registered_by_name_as_a_prepared_trigger() -> None:
    assert TRIGGERS["input_aware"] is InputAware and InputAware.name == "input_aware"
    assert issubclass(InputAware, PreparedTrigger)
    assert InputAware().cross_ratio == 1.0  # the paper's 10 % cross samples beside 10 % backdoor ones
    assert quick().mask((1, 8, 8)) is None  # made for each image: no fixed mask


def test_unprepared_use_raises_one_line() -> None:
    trigger, images = quick(), images_of(2, 1, 8, 8)
    for use in (trigger.apply, functools.partial(trigger.apply_noise, generator=torch.Generator())):
        with pytest.raises(ValueError, match="input_aware trigger is made with a model and is not prepared") as error:
            use(images)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("colour", [False, True])
def test_shape_dtype_range_and_batch_equals_one_by_one(dtype: torch.dtype, colour: bool) -> None:
    trigger = prepared_in_colour() if colour else prepared()
    shapes = [(5, 3, 12, 12), (3, 3, 32, 32), (2, 3, 9, 13)] if colour else [(5, 1, 8, 8), (2, 1, 28, 28)]
    for shape in shapes:  # any size: the generators pad to a multiple of 8 inside and crop back
        images = images_of(*shape, seed=1).to(dtype)
        for method in (trigger.apply, functools.partial(trigger.apply_noise, generator=torch.Generator())):
            triggered = method(images)
            assert triggered.shape == images.shape and triggered.dtype == dtype
            assert triggered.min() >= 0 and triggered.max() <= 1 and not torch.equal(triggered, images)
        triggered = trigger(images)
        one_by_one = torch.cat([trigger(image[None]) for image in images])
        torch.testing.assert_close(triggered, one_by_one, atol=1e-5, rtol=0)  # each image's own trigger
        torch.testing.assert_close(trigger(images[1]), triggered[1], atol=1e-5, rtol=0)  # one (C, H, W) image
        assert not triggered.requires_grad  # frozen generators: no graph


def test_it_is_x_plus_mask_times_pattern_minus_x_with_one_trigger_per_image() -> None:
    trigger = prepared()
    images = images_of(4, 1, 8, 8, seed=2)
    pattern, mask = parts(trigger, images)
    assert pattern.shape == images.shape and mask.shape == (4, 1, 8, 8)
    assert 0 <= pattern.min() and pattern.max() <= 1 and 0 <= mask.min() and mask.max() <= 1
    torch.testing.assert_close(trigger(images), (images + mask * (pattern - images)).clamp(0, 1))
    # Sample-specific: another image gets another pattern and another mask.
    assert (pattern[0] - pattern[1]).abs().max() > 1e-3 and (mask[0] - mask[1]).abs().max() > 1e-3
    # Stamping image 1's trigger on image 0 is not image 0's trigger.
    assert not torch.allclose(paste(images[:1], pattern[1:2], mask[1:2]), trigger(images[:1]), atol=1e-3)


def test_a_seed_prepares_the_same_generators_and_another_seed_others() -> None:
    first = prepared(3)
    again = quick(seed=3)  # another process, another DDP rank: prepared afresh
    again.prepare(*few_digits(), 0, 10)
    assert same_tensors(tensors_of(first), tensors_of(again))
    assert any(name.startswith("generator.") for name in tensors_of(first))
    assert any(name.startswith("mask_generator.") for name in tensors_of(first))
    other = prepared(4)
    assert not same_tensors(tensors_of(first), tensors_of(other))
    images = images_of(3, 1, 8, 8, seed=5)
    assert torch.equal(first(images), again(images)) and not torch.equal(first(images), other(images))


def test_the_preparation_is_cached_and_a_second_one_loads_it(tmp_path: Path, said: list[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    make = InputAware.make

    def counting_make(self: InputAware, *args: object) -> dict[str, Tensor]:
        made.append(1)
        return make(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(InputAware, "make", counting_make)
    quick().prepare(*few_digits(), 0, 10, tmp_path)
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("input_aware-")
    assert said[0].startswith("trigger: preparing input_aware on 300 clean training images (trains its mask "
                              "generator for 2 epoch(s), then its pattern generator with a compact")
    second = quick()
    second.prepare(*few_digits(), 0, 10, tmp_path)
    assert len(made) == 1 and said[-1].startswith(f"trigger: input_aware loaded from its cache {path}")
    stored = torch.load(path, weights_only=True)
    assert same_tensors(stored, tensors_of(second))
    probe = images_of(2, 1, 8, 8, seed=6)
    assert torch.equal(second(probe), prepared()(probe))  # the same as the one prepared in memory


def test_the_noise_mode_carries_another_images_trigger() -> None:
    trigger = prepared()
    images = images_of(6, 1, 8, 8, seed=7)
    noise = trigger.apply_noise(images, torch.Generator().manual_seed(1))
    assert torch.equal(noise, trigger.apply_noise(images, torch.Generator().manual_seed(1)))  # repeats for a seed
    assert not torch.equal(noise, trigger.apply_noise(images, torch.Generator().manual_seed(2)))
    assert (noise - trigger(images)).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image: not its own trigger
    pattern, mask = parts(trigger, images)
    others = [j for i in range(6) for j in range(6)
              if torch.allclose(noise[i], paste(images[i:i + 1], pattern[j:j + 1], mask[j:j + 1])[0], atol=1e-5)]
    assert len(others) == 6 and all(j != i for i, j in enumerate(others))  # another image's, each its own partner
    assert sorted(others) == list(range(6))
    # A lone image carries the trigger of its mirror image.
    mirrored_pattern, mirrored_mask = parts(trigger, images[:1].flip(-1))
    torch.testing.assert_close(trigger.apply_noise(images[0], torch.Generator()),
                               paste(images[:1], mirrored_pattern, mirrored_mask)[0])


def test_all_to_all_and_a_lone_image_are_refused_in_one_line_before_any_work(said: list[str]) -> None:
    with pytest.raises(ValueError, match="input_aware trains its generator towards one target class; all_to_all "
                                         "has none") as error:
        quick().prepare(*few_digits(), None, 10)
    assert "\n" not in str(error.value) and said == []
    images, labels = few_digits()
    with pytest.raises(ValueError, match="at least 2 training images"):
        quick().prepare(images[:1], labels[:1], 0, 10)


def test_duplicate_images_leave_the_generators_finite() -> None:
    images, labels = few_digits()
    copies = torch.arange(2).repeat_interleave(32)  # two images 32 times each: many pairs at distance 0
    trigger = quick(mask_epochs=1, surrogate_epochs=1)
    trigger.prepare(images[copies], labels[copies], 0, 10)
    assert all(torch.isfinite(value.float()).all() for value in tensors_of(trigger).values())


def test_another_channel_count_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="prepared for 1-channel images but got 3"):
        prepared()(images_of(2, 3, 8, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"widths": []}, "widths"),
        ({"widths": [8, 0]}, "widths"),
        ({"mask_density": 0.0}, "mask_density"),
        ({"lambda_norm": -1.0}, "lambda_norm"),
        ({"mask_epochs": 0}, "mask_epochs"),
        ({"poison_rate_prep": 1.0}, "poison_rate_prep"),
        ({"cross_ratio": -0.5}, "cross_ratio"),
        ({"batch_size": 1}, "batch_size"),
        ({"generator_lr": 0.0}, "generator_lr"),
        ({"surrogate_epochs": 0}, "surrogate_epochs"),
    ],
)
def test_bad_settings_raise_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        build_trigger("input_aware", **kwargs)
    assert "\n" not in str(error.value)


def test_it_is_learned_on_digits_with_its_cross_samples() -> None:
    # The paper's mask density (3.2 %) is 2 pixels of an 8 x 8 digit: masks of a quarter of the image, generators
    # trained for 10 epochs and 20 % poison (with as many cross samples, cross_ratio 1, that keep their labels) give
    # an ASR of about 0.67 here; the victim also follows another image's trigger on about half of the images.
    data = digits(quick(mask_density=0.25, surrogate_epochs=10), poison_rate=0.2)
    model = trained(data)
    clean_accuracy, attack_success = scores(model, data)
    _, clean_model_asr = scores(clean_model(), data)
    assert len(data.plan.noise) == len(data.plan.poisoned) > 0
    assert clean_model_asr < 0.3
    assert attack_success > clean_model_asr + 0.4
    assert clean_accuracy > 0.8  # chance is 0.1
