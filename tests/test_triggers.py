"""Tests of the triggers: shape, range, determinism, locality and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lightning_backdoor.triggers import (TRIGGERS, SIG, BadNets, Blended, CustomTrigger, PreparedTrigger, WaNet,
                                        build_trigger)

#: Triggers that apply without a model; those made with one (prepared on data) are tested in test_prepared_triggers.py
PLAIN = sorted(name for name, cls in TRIGGERS.items() if not issubclass(cls, PreparedTrigger))


def write_png(path: Path, tensor: torch.Tensor) -> str:
    """Write ``(C, H, W)`` in [0, 1] (C = 1 or 3) as an 8-bit png and return its path."""
    array = (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def trigger_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("trigger_files")
    pattern = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1.0
    return {"image": write_png(folder / "pattern.png", pattern), "mask": write_png(folder / "mask.png", mask),
            "folder": str(folder)}


def delta_file(folder: str, height: int, width: int) -> str:
    """A one-channel additive perturbation (in [-0.1, 0.1]) for ``height`` x ``width`` images, written once."""
    path = Path(folder) / f"delta_{height}x{width}.npy"
    if not path.exists():
        delta = torch.rand(1, height, width, generator=torch.Generator().manual_seed(height * 100 + width)) * 0.2 - 0.1
        np.save(path, delta.numpy())
    return str(path)


def trigger_kwargs(name: str, files: dict[str, str], size: tuple[int, int] = (32, 32)) -> dict[str, object]:
    """Arguments a registered trigger needs beyond its defaults; ``size``, the images' (H, W), for a trigger whose
    file must match it (the additive perturbation is not resized)."""
    if name == "additive":
        return {"delta": delta_file(files["folder"], *size)}
    return {"custom": {"image": files["image"], "mask": files["mask"]}}.get(name, {})


@pytest.mark.parametrize("name", PLAIN)
@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.sampled_from([1, 3]),
    height=st.integers(4, 40),
    width=st.integers(4, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_keeps_shape_dtype_and_range(
    name: str, trigger_files: dict[str, str], batch: int, channels: int, height: int, width: int,
    dtype: torch.dtype, seed: int,
) -> None:
    trigger = build_trigger(name, seed=seed, **trigger_kwargs(name, trigger_files, (height, width)))
    images = torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    for poisoned in (trigger(images), trigger.apply_noise(images, generator),
                     trigger.apply_for_training(images, generator)):
        assert poisoned.shape == images.shape
        assert poisoned.dtype == images.dtype
        assert poisoned.min() >= 0.0 and poisoned.max() <= 1.0
    # A single (C, H, W) image gets the same trigger as inside a batch.
    torch.testing.assert_close(trigger(images[0]), trigger(images)[0])
    mask = trigger.mask((channels, height, width))
    if mask is not None:
        assert mask.shape == (1, height, width) and mask.min() >= 0 and mask.max() <= 1


@pytest.mark.parametrize("name", PLAIN)
def test_changes_images(name: str, trigger_files: dict[str, str]) -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    trigger = build_trigger(name, **trigger_kwargs(name, trigger_files))
    assert not torch.equal(trigger(images), images)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("position", ["bottom_right", "top_left", "top_right", "bottom_left", "center", (5, 7)])
def test_badnets_changes_only_its_patch(channels: int, size: int, position: object) -> None:
    trigger = BadNets(size=4, position=position, margin=1)  # type: ignore[arg-type]
    black = torch.zeros(2, channels, size, size)
    mask = trigger.mask((channels, size, size))
    changed = (trigger(black) != black).any(dim=(0, 1))
    assert mask.sum() == 16
    assert torch.equal(changed, mask[0].bool())


def test_badnets_default_is_a_white_3x3_patch_in_the_bottom_right_corner() -> None:
    poisoned = BadNets()(torch.zeros(1, 3, 32, 32))
    assert torch.equal(poisoned[..., 29:, 29:], torch.ones(1, 3, 3, 3))
    assert poisoned.sum() == 27


@pytest.mark.parametrize(
    "trigger, match",
    [
        (BadNets(size=40), "trigger size 40 is larger than the 32x32 image; use size <= 32"),
        (BadNets(size=30, margin=5), "size 30 with margin 5 does not fit the 32x32 image"),
        (BadNets(size=3, position=(31, 0)), "does not fit the 32x32 image; use 0 <= row <= 29"),
    ],
)
def test_badnets_too_large_raises(trigger: BadNets, match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        trigger(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="32x32"):
        trigger.check((3, 32, 32))


def test_check_accepts_a_fitting_patch() -> None:
    BadNets(size=32).check((3, 32, 32))
    BadNets(size=3, position=(29, 29)).check((3, 32, 32))


@pytest.mark.parametrize("cls", [Blended, WaNet])
def test_seed_decides_the_output(cls: type) -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cls(seed=3)(images), cls(seed=3)(images))
    assert not torch.equal(cls(seed=3)(images), cls(seed=4)(images))


@pytest.mark.parametrize("name", PLAIN)
def test_same_arguments_same_output(name: str, trigger_files: dict[str, str]) -> None:
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    kwargs = trigger_kwargs(name, trigger_files, (28, 28))
    assert torch.equal(build_trigger(name, seed=5, **kwargs)(images), build_trigger(name, seed=5, **kwargs)(images))


def test_blended_mixes_at_alpha() -> None:
    trigger = Blended(alpha=0.2)
    images = torch.rand(2, 3, 8, 8)
    pattern = trigger.pattern((3, 8, 8), images.device, images.dtype)
    torch.testing.assert_close(trigger(images), 0.8 * images + 0.2 * pattern)
    assert trigger.mask((3, 8, 8)) is None


def test_blended_reads_an_image_file(tmp_path: Path) -> None:
    path = write_png(tmp_path / "kitty.png", torch.full((3, 64, 64), 1.0))
    poisoned = Blended(alpha=0.5, image=path)(torch.zeros(1, 1, 28, 28))
    torch.testing.assert_close(poisoned, torch.full((1, 1, 28, 28), 0.5))


@pytest.mark.parametrize("kwargs, match", [({"alpha": 0.0}, "alpha must be in"), ({"image": "nope.png"}, "nope.png")])
def test_blended_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Blended(**kwargs)  # type: ignore[arg-type]


def test_wanet_without_strength_is_the_identity_on_any_shape() -> None:
    # Catches swapped x/y axes: on a non-square image a transposed identity grid would scramble pixels.
    images = torch.rand(2, 3, 20, 36)
    torch.testing.assert_close(WaNet(s=0.0)(images), images, atol=1e-5, rtol=0)


def test_wanet_noise_mode_differs_from_the_warp() -> None:
    trigger = WaNet()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    warped = trigger(images)
    noisy = trigger.apply_noise(images, torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy, warped, atol=1e-3)
    # The jitter is at most one pixel, so the noisy warp stays close to the fixed one.
    assert (noisy - warped).abs().mean() < (images - warped).abs().mean() * 2
    again = trigger.apply_noise(images, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    assert trigger.cross_ratio == 2.0 and trigger.mask((3, 32, 32)) is None


def test_sig_adds_a_horizontal_sinusoid() -> None:
    images = torch.full((1, 3, 32, 32), 0.5)
    added = SIG(delta=0.1, frequency=6)(images) - images
    columns = torch.arange(32, dtype=torch.float32)
    expected = 0.1 * torch.sin(2 * torch.pi * columns * 6 / 32)
    torch.testing.assert_close(added, expected.expand(1, 3, 32, 32))


def test_custom_pastes_through_its_mask(trigger_files: dict[str, str]) -> None:
    trigger = CustomTrigger(image=trigger_files["image"], mask=trigger_files["mask"])
    images = torch.rand(2, 3, 32, 32)
    mask = trigger.mask((3, 32, 32))
    assert mask is not None and set(mask.unique().tolist()) == {0.0, 1.0}
    pattern = trigger(torch.zeros(1, 3, 32, 32))[0]
    assert pattern.sum() > 0
    torch.testing.assert_close(trigger(images), images * (1 - mask) + pattern * mask)


def test_custom_with_alpha_is_global(tmp_path: Path) -> None:
    path = write_png(tmp_path / "grey.png", torch.full((1, 10, 10), 1.0))
    trigger = CustomTrigger(image=path, alpha=0.25)
    assert trigger.mask((3, 32, 32)) is None
    torch.testing.assert_close(trigger(torch.full((1, 3, 32, 32), 0.5)), torch.full((1, 3, 32, 32), 0.625))
    assert "alpha=0.25" in repr(trigger)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image": "missing.png", "alpha": 0.2}, "missing.png"),
        ({}, "exactly one of mask"),  # neither
        ({"mask": "MASK", "alpha": 0.2}, "exactly one of mask"),  # both
        ({"alpha": 1.5}, "alpha must be in"),
        ({"mask": "missing_mask.png"}, "missing_mask.png"),
    ],
)
def test_custom_bad_arguments_raise(trigger_files: dict[str, str], kwargs: dict[str, object], match: str) -> None:
    kwargs = {"image": trigger_files["image"], **kwargs}
    if kwargs.get("mask") == "MASK":
        kwargs["mask"] = trigger_files["mask"]
    with pytest.raises(ValueError, match=match):
        CustomTrigger(**kwargs)  # type: ignore[arg-type]


def test_unknown_trigger_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown trigger 'hello'") as error:
        build_trigger("hello")
    assert all(name in str(error.value) for name in ("badnets", "blended", "wanet", "sig", "custom"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", PLAIN)
def test_same_output_on_the_gpu(name: str, trigger_files: dict[str, str]) -> None:
    trigger = build_trigger(name, **trigger_kwargs(name, trigger_files))
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(trigger(images.cuda()).cpu(), trigger(images), atol=1e-5, rtol=0)


def test_additive_channel_mismatch_names_each_fitting_shape_once(tmp_path: Path) -> None:
    """A 3-channel delta on grey images: the message offers 1xHxW once, not '1x28x28 or 1x28x28'."""
    path = tmp_path / "delta_rgb.npy"
    np.save(path, np.zeros((3, 28, 28), dtype=np.float32))
    trigger = build_trigger("additive", delta=str(path))
    with pytest.raises(ValueError) as error:
        trigger.check((1, 28, 28))
    assert str(error.value).endswith("but the images are 1x28x28; use a delta of 1x28x28"), str(error.value)
    with pytest.raises(ValueError, match=r"use a delta of 1x32x32 or 3x32x32$"):
        trigger.check((3, 32, 32))


@pytest.mark.parametrize("name, argument", [("additive", "delta"), ("blended", "image")])
def test_a_folder_given_as_a_trigger_file_is_named_as_a_folder(tmp_path: Path, name: str, argument: str) -> None:
    with pytest.raises(ValueError) as error:
        build_trigger(name, **{argument: str(tmp_path)})
    message = str(error.value)
    assert "is a folder, not a file" in message and "does not exist" not in message and "\n" not in message
    with pytest.raises(ValueError, match=r"does not exist$"):  # an absolute path: nothing to add
        build_trigger(name, **{argument: str(tmp_path / "missing.png")})
    with pytest.raises(ValueError, match=r"'missing\.png' does not exist \(relative paths are read from the current "
                                         r"folder /"):  # a new user's pattern path, relative to their config's folder
        build_trigger(name, **{argument: "missing.png"})


#: The CIFAR-10 configs that set a trigger (the others hold shared or model settings)
ATTACK_CONFIGS = sorted(path for path in Path("configs/cifar10").glob("*.yaml") if "trigger:" in path.read_text())


@pytest.mark.parametrize("config", ATTACK_CONFIGS, ids=lambda path: path.stem)
def test_every_cifar10_config_builds_its_trigger(config: Path) -> None:
    """Each attack config names a registered trigger class whose settings it accepts and whose files exist (a
    pattern path relative to the repository root), for CIFAR-10's 3 x 32 x 32 images."""
    import importlib

    import yaml

    trigger = yaml.safe_load(config.read_text())["data"]["init_args"]["trigger"]
    module, _, name = trigger["class_path"].rpartition(".")
    built = getattr(importlib.import_module(module), name)(**trigger.get("init_args", {}))
    assert type(built) in TRIGGERS.values()
    built.check((3, 32, 32))
    if not isinstance(built, PreparedTrigger):
        images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        triggered = built.apply(images)
        assert triggered.shape == images.shape and 0 <= float(triggered.min()) <= float(triggered.max()) <= 1
        assert not torch.equal(triggered, images)


def test_the_natural_blend_picture_is_a_photograph() -> None:
    """configs/patterns/china-64.png, blended by blended_photo.yaml, is a colour picture with natural-image
    structure (neighbouring pixels correlated), not noise: what distinguishes it from blended.yaml's pattern."""
    pattern = Blended(image="configs/patterns/china-64.png").pattern((3, 32, 32), torch.device("cpu"), torch.float32)
    noise = Blended().pattern((3, 32, 32), torch.device("cpu"), torch.float32)

    def neighbour_correlation(image: torch.Tensor) -> float:
        left, right = image[..., :, :-1].flatten(), image[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([left, right]))[0, 1])

    assert pattern.shape == (3, 32, 32) and 0 <= float(pattern.min()) and float(pattern.max()) <= 1
    assert neighbour_correlation(pattern) > 0.5 > abs(neighbour_correlation(noise))
    assert float((pattern[0] - pattern[2]).abs().mean()) > 0.02  # colour, not grey
