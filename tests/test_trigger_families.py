"""The four pixel-space trigger families: BppAttack, FTrojan, Adaptive-Blend and Additive.

Each keeps shape, dtype and the [0, 1] range, repeats for a seed, treats a batch as its images one by one, and does
what its paper says it does (checked against a reference written here, not against the trigger's own helpers)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_backdoor.data.poisoning import apply_noise_mode, apply_training_trigger, apply_trigger, plan_splits
from lightning_backdoor.triggers import TRIGGERS, AdaptiveBlend, Additive, Blended, BppAttack, FTrojan, build_trigger
from lightning_backdoor.triggers.ftrojan import dct_matrix

NAMES = ("bpp", "ftrojan", "adaptive_blend", "additive")


def images_of(*shape: int, seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * (high - low) + low


def save_delta(path: Path, array: np.ndarray) -> str:
    np.save(path, array)
    return str(path)


@pytest.fixture
def delta_32(tmp_path: Path) -> str:
    """A 3-channel perturbation for 32 x 32 images, (C, H, W), in [-0.1, 0.1]."""
    return save_delta(tmp_path / "delta.npy", (images_of(3, 32, 32, seed=9).numpy() * 0.2 - 0.1))


def build(name: str, delta: str, seed: int = 0) -> object:
    return build_trigger(name, seed=seed, **({"delta": delta} if name == "additive" else {}))


# --- what every family shares ---------------------------------------------------------------------------------------


def test_the_four_are_registered_by_name() -> None:
    classes = {"bpp": BppAttack, "ftrojan": FTrojan, "adaptive_blend": AdaptiveBlend, "additive": Additive}
    for name, cls in classes.items():
        assert TRIGGERS[name] is cls and cls.name == name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_range_and_batch_equals_one_by_one(name: str, dtype: torch.dtype, delta_32: str) -> None:
    trigger = build(name, delta_32)
    images = images_of(5, 3, 32, 32, seed=1).to(dtype)
    triggered = trigger(images)
    assert triggered.shape == images.shape and triggered.dtype == dtype
    assert triggered.min() >= 0 and triggered.max() <= 1
    assert not torch.equal(triggered, images)
    one_by_one = torch.cat([trigger(image[None]) for image in images])
    assert torch.equal(triggered, one_by_one)
    assert torch.equal(trigger(images[2]), triggered[2])  # one (C, H, W) image
    # The training-time trigger (the data module's poisoning) and the noise mode: a batch draws what its images
    # drawn one by one from the same generator would.
    for method in (trigger.apply_for_training, trigger.apply_noise):
        batch = method(images, torch.Generator().manual_seed(7))
        generator = torch.Generator().manual_seed(7)
        assert torch.equal(batch, torch.cat([method(image[None], generator) for image in images]))
        assert batch.shape == images.shape and batch.min() >= 0 and batch.max() <= 1
    assert trigger.mask((3, 32, 32)) is None  # all four are global


@pytest.mark.parametrize("name", NAMES)
def test_same_arguments_same_output(name: str, delta_32: str) -> None:
    images = images_of(3, 3, 32, 32, seed=2)
    assert torch.equal(build(name, delta_32, seed=4)(images), build(name, delta_32, seed=4)(images))
    first = build(name, delta_32, seed=4).apply_for_training(images, torch.Generator().manual_seed(1))
    again = build(name, delta_32, seed=4).apply_for_training(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)


def test_adaptive_blend_depends_on_its_seeds() -> None:
    images = images_of(4, 3, 32, 32, seed=3)
    assert not torch.equal(AdaptiveBlend(seed=3)(images), AdaptiveBlend(seed=4)(images))
    trigger = AdaptiveBlend(seed=3)
    pieces = [trigger.apply_for_training(images, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(pieces[0], pieces[1]) and not torch.equal(pieces[0], pieces[2])


@pytest.mark.parametrize("name", ["bpp", "ftrojan", "additive"])
def test_unseeded_families_ignore_the_seed(name: str, delta_32: str) -> None:
    images = images_of(2, 3, 32, 32, seed=4)
    assert torch.equal(build(name, delta_32, seed=0)(images), build(name, delta_32, seed=123)(images))


# --- BppAttack ------------------------------------------------------------------------------------------------------


def floyd_steinberg_reference(image: np.ndarray, bits: int) -> np.ndarray:
    """Textbook Floyd–Steinberg on one (H, W) channel, pixel by pixel in float64."""
    levels = 2**bits - 1
    work = image.astype(np.float64).copy()
    height, width = work.shape
    for row in range(height):
        for col in range(width):
            old = work[row, col]
            new = min(max(np.round(old * levels) / levels, 0.0), 1.0)
            work[row, col] = new
            error = old - new
            for d_row, d_col, share in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                r, c = row + d_row, col + d_col
                if r < height and 0 <= c < width:
                    work[r, c] += error * share / 16
    return work


@pytest.mark.parametrize("bits", [1, 3, 5])
@pytest.mark.parametrize("dither", [True, False])
def test_bpp_takes_at_most_2_to_the_bits_values_per_channel(bits: int, dither: bool) -> None:
    images = images_of(6, 3, 32, 32, seed=5)
    squeezed = BppAttack(bits=bits, dither=dither)(images)
    levels = 2**bits - 1
    for channel in range(3):
        assert squeezed[:, channel].unique().numel() <= 2**bits
    # Every value is a level k / (2**bits - 1).
    torch.testing.assert_close(squeezed * levels, torch.round(squeezed * levels), atol=1e-5, rtol=0)


def test_bpp_without_dithering_is_plain_rounding() -> None:
    images = images_of(4, 3, 32, 32, seed=6)
    torch.testing.assert_close(BppAttack(bits=5, dither=False)(images), torch.round(images * 31) / 31)


@pytest.mark.parametrize("bits", [1, 2, 5])
def test_bpp_dithering_is_floyd_steinberg(bits: int) -> None:
    images = images_of(2, 3, 9, 11, seed=7).double()
    dithered = BppAttack(bits=bits)(images)
    for image, result in zip(images, dithered):
        for channel, out in zip(image, result):
            expected = floyd_steinberg_reference(channel.numpy(), bits)
            np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_bpp_dithering_keeps_the_local_mean_better_than_rounding() -> None:
    # A smooth ramp squeezed to 2 levels: rounding makes one hard edge, dithering keeps the grey levels on average.
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32).clone()
    blocks = lambda x: torch.nn.functional.avg_pool2d(x, 8)  # noqa: E731
    dithered_error = (blocks(BppAttack(bits=1)(ramp)) - blocks(ramp)).abs().mean()
    rounded_error = (blocks(BppAttack(bits=1, dither=False)(ramp)) - blocks(ramp)).abs().mean()
    assert dithered_error < rounded_error / 3


def test_bpp_bad_bits_raise() -> None:
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bpp bits must be in 1..8"):
            BppAttack(bits=bits)


# --- FTrojan --------------------------------------------------------------------------------------------------------


def test_the_dct_matrix_is_orthonormal_and_diagonalises_cosines() -> None:
    for size in (1, 7, 32):
        matrix = dct_matrix(size)
        torch.testing.assert_close(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), atol=1e-12, rtol=0)
    # The DCT of the k-th cosine, cos(pi (2 i + 1) k / 2n), is one coefficient, at k.
    n, k = 32, 11
    cosine = torch.cos(math.pi * (2 * torch.arange(n, dtype=torch.float64) + 1) * k / (2 * n))
    coefficients = dct_matrix(n) @ cosine
    assert coefficients.abs().argmax() == k
    torch.testing.assert_close(coefficients[k], torch.tensor(math.sqrt(n / 2), dtype=torch.float64))
    assert (coefficients.abs() > 1e-9).sum() == 1


def yuv_reference(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 YUV of (N, 3, H, W), written out: Y = .299 R + .587 G + .114 B, U = .492 (B - Y), V = .877 (R - Y)."""
    red, green, blue = rgb.unbind(1)
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    return torch.stack((luma, 0.492 * (blue - luma), 0.877 * (red - luma)), dim=1)


def block_dct(planes: torch.Tensor, block: int) -> torch.Tensor:
    """2-D orthonormal DCT of every block x block block of (..., H, W), by the cosine sum written out."""
    i = torch.arange(block, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * block))  # (k, i)
    scale = torch.full((block,), math.sqrt(2 / block), dtype=torch.float64)
    scale[0] = math.sqrt(1 / block)
    basis = basis * scale[:, None]
    height, width = planes.shape[-2:]
    tiles = planes.unflatten(-2, (height // block, block)).unflatten(-1, (width // block, block))  # (.., bh, b, bw, b)
    return torch.einsum("ki,...aibj,lj->...akbl", basis, tiles, basis)


@pytest.mark.parametrize("block, positions", [(None, None), (8, [(3, 3), (7, 7)]), (16, [(4, 9)])])
def test_ftrojan_puts_its_change_at_the_chosen_frequencies_of_u_and_v(block: int | None, positions: object) -> None:
    trigger = FTrojan(magnitude=30 / 255, positions=positions, block=block)  # type: ignore[arg-type]
    images = images_of(3, 3, 32, 32, seed=8, low=0.3, high=0.7).double()  # far from 0 and 1: nothing is clamped
    triggered = trigger(images)
    assert 0 < triggered.min() and triggered.max() < 1
    size = block or 32
    chosen = [(15, 15), (31, 31)] if positions is None else positions
    coefficients = block_dct(yuv_reference(triggered - images), size)  # (N, 3, blocks, size, blocks, size)
    expected = torch.zeros(size, size, dtype=torch.float64)
    for row, col in chosen:  # type: ignore[union-attr]
        expected[row, col] = 30 / 255
    zeros = torch.zeros_like(coefficients[:, 0])
    torch.testing.assert_close(coefficients[:, 0], zeros, atol=1e-12, rtol=0)  # Y unchanged
    for channel in (1, 2):  # U and V: exactly the bumps in every block, nothing elsewhere
        torch.testing.assert_close(coefficients[:, channel], expected[None, None, :, None, :].expand_as(zeros),
                                   atol=1e-12, rtol=0)


def test_ftrojan_on_grey_images_bumps_their_one_channel() -> None:
    images = images_of(2, 1, 28, 28, seed=9, low=0.3, high=0.7).double()
    change = FTrojan(magnitude=0.1)(images) - images
    coefficients = block_dct(change, 28)[:, 0, 0, :, 0, :]
    expected = torch.zeros(28, 28, dtype=torch.float64)
    expected[13, 13] = expected[27, 27] = 0.1
    torch.testing.assert_close(coefficients, expected.expand(2, 28, 28), atol=1e-12, rtol=0)


def test_ftrojan_default_is_the_papers_cifar10_setting() -> None:
    trigger = FTrojan()
    assert trigger.frequencies(32, 32) == ((15, 15), (31, 31)) and trigger.magnitude == pytest.approx(30 / 255)
    change = trigger(torch.full((1, 3, 32, 32), 0.5)) - 0.5
    assert 0 < change.abs().max() < 10 / 255  # invisible: a few grey levels at most


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        ({"block": 5}, (3, 32, 32), "ftrojan block 5 does not tile the 32x32 image"),
        ({"block": 8, "positions": [(8, 0)]}, (3, 32, 32), r"positions \[\(8, 0\)\] are outside the 8x8 DCT block"),
        ({}, (2, 32, 32), "greyscale .* or RGB"),
    ],
)
def test_ftrojan_check_refuses_what_it_cannot_do(kwargs: dict, shape: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FTrojan(**kwargs).check(shape)
    with pytest.raises(ValueError, match=match):
        FTrojan(**kwargs)(torch.zeros(1, *shape))


@pytest.mark.parametrize("kwargs", [{"magnitude": 0.0}, {"magnitude": 30.0}, {"block": 0}, {"positions": []}])
def test_ftrojan_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="ftrojan"):
        FTrojan(**kwargs)


# --- Adaptive-Blend -------------------------------------------------------------------------------------------------


def test_adaptive_blend_training_changes_whole_pieces_only_and_exactly_train_pieces_of_them() -> None:
    trigger = AdaptiveBlend(alpha=0.2, pieces=4, train_pieces=8, seed=1)
    images = images_of(6, 3, 32, 32, seed=10)
    triggered = trigger.apply_for_training(images, torch.Generator().manual_seed(2))
    pattern = trigger.pattern((3, 32, 32), images.device, images.dtype)
    # The 4 x 4 grid of 8 x 8 cells, written out here: (N, C, 4, 8, 4, 8).
    cells = lambda x: x.unflatten(-2, (4, 8)).unflatten(-1, (4, 8))  # noqa: E731
    changed = cells(triggered != images).any(dim=1)  # (N, 4, 8, 4, 8)
    per_cell_any, per_cell_all = changed.any(dim=(2, 4)), changed.all(dim=(2, 4))  # (N, 4, 4)
    assert torch.equal(per_cell_any, per_cell_all)  # a cell is changed everywhere or nowhere
    assert per_cell_any.sum(dim=(1, 2)).tolist() == [8] * 6
    assert len({tuple(cell.flatten().tolist()) for cell in per_cell_any}) > 1  # the pieces differ between images
    blended = torch.lerp(images, pattern.expand_as(images), 0.2)
    inside = changed[:, None].expand(-1, 3, -1, -1, -1, -1)
    torch.testing.assert_close(cells(triggered)[inside], cells(blended)[inside])
    assert torch.equal(cells(triggered)[~inside], cells(images)[~inside])
    # The trigger's own piece masks say the same.
    masks = trigger.piece_masks(6, 32, 32, torch.Generator().manual_seed(2))
    assert torch.equal(masks[:, 0].bool(), (triggered != images).any(dim=1))


def test_adaptive_blend_at_test_time_blends_the_whole_pattern() -> None:
    trigger = AdaptiveBlend(test_alpha=0.25, seed=5)
    images = images_of(3, 3, 32, 32, seed=11)
    pattern = Blended(seed=5).pattern((3, 32, 32), images.device, images.dtype)  # the same seeded pattern
    torch.testing.assert_close(trigger(images), 0.75 * images + 0.25 * pattern)


def test_adaptive_blend_on_an_uneven_grid_uses_every_pixel() -> None:
    trigger = AdaptiveBlend(pieces=3, train_pieces=9)  # every piece: the whole pattern at alpha
    images = images_of(2, 1, 20, 29, seed=12)
    pattern = trigger.pattern((1, 20, 29), images.device, images.dtype)
    torch.testing.assert_close(trigger.apply_for_training(images, torch.Generator().manual_seed(0)),
                               torch.lerp(images, pattern.expand_as(images), trigger.alpha))
    index = trigger.piece_index(20, 29)
    assert index.unique().tolist() == list(range(9))


def test_adaptive_blend_reads_a_pattern_image(tmp_path: Path) -> None:
    path = tmp_path / "white.png"
    Image.fromarray(np.full((40, 40, 3), 255, dtype=np.uint8)).save(path)
    triggered = AdaptiveBlend(test_alpha=0.5, image=str(path))(torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(triggered, torch.full((1, 3, 32, 32), 0.5))


def test_adaptive_blend_in_the_data_modules_poisoning() -> None:
    trigger = AdaptiveBlend(seed=0)
    pixels = (images_of(20, 3, 32, 32, seed=13) * 255).round().to(torch.uint8)
    poisoned = apply_training_trigger(trigger, pixels, seed=3)
    assert torch.equal(poisoned, apply_training_trigger(trigger, pixels, seed=3))  # repeats for a seed
    assert not torch.equal(poisoned, apply_training_trigger(trigger, pixels, seed=4))
    assert not torch.equal(poisoned, apply_trigger(trigger, pixels))  # training and test triggers differ
    assert not torch.equal(poisoned, apply_noise_mode(trigger, pixels, seed=3))  # poisoned and regularisation draws
    # Every other trigger poisons training images with its test-time trigger, bit for bit as before.
    assert torch.equal(apply_training_trigger(Blended(), pixels, seed=3), apply_trigger(Blended(), pixels))
    # Regularisation samples: cross_ratio of them per poisoned sample, drawn from the clean training images.
    labels = torch.arange(10).repeat(100)
    plan = plan_splits(labels, 10, 0, 0.01, 0, 0.0, False, AdaptiveBlend(cross_ratio=1.0).cross_ratio, seed=0)
    assert len(plan.noise) == len(plan.poisoned) == 10 and not torch.isin(plan.noise, plan.poisoned).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0.0}, "alpha must be in"),
        ({"test_alpha": 1.5}, "test_alpha must be in"),
        ({"pieces": 0}, "pieces"),
        ({"train_pieces": 17}, r"train_pieces must be in 1..16"),
        ({"cross_ratio": -1.0}, "cross_ratio"),
        ({"image": "no_such.png"}, "no_such.png"),
    ],
)
def test_adaptive_blend_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveBlend(**kwargs)


def test_adaptive_blend_refuses_more_pieces_than_pixels() -> None:
    with pytest.raises(ValueError, match="pieces=8 cuts the 5x40 image"):
        AdaptiveBlend(pieces=8)(torch.zeros(1, 3, 5, 40))


# --- Additive -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["chw", "hwc", "hw"])
def test_additive_is_clamp_of_x_plus_delta(tmp_path: Path, layout: str) -> None:
    delta = images_of(3, 32, 32, seed=14) * 0.6 - 0.3  # large enough to need the clamp
    array = {"chw": delta, "hwc": delta.permute(1, 2, 0), "hw": delta[0]}[layout].numpy()
    path = save_delta(tmp_path / "delta.npy", array)
    images = images_of(4, 3, 32, 32, seed=15)
    expected = (images + (delta if layout != "hw" else delta[:1])).clamp(0, 1)
    torch.testing.assert_close(Additive(path)(images), expected)
    # scale multiplies delta, epsilon clips it
    scaled = (0.5 * (delta if layout != "hw" else delta[:1])).clamp(-0.1, 0.1)
    torch.testing.assert_close(Additive(path, scale=0.5, epsilon=0.1)(images), (images + scaled).clamp(0, 1))


def test_additive_reads_a_signed_image(tmp_path: Path) -> None:
    values = (images_of(32, 32, 3, seed=16) * 255).round().to(torch.uint8)
    path = tmp_path / "delta.png"
    Image.fromarray(values.numpy()).save(path)
    delta = (values.permute(2, 0, 1).double() / 255 - 0.5) * 2 * 0.1  # (value - 0.5) * 2 * scale
    images = images_of(2, 3, 32, 32, seed=17).double()
    torch.testing.assert_close(Additive(str(path), scale=0.1)(images), (images + delta).clamp(0, 1))
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(grey)  # 128/255: +1/255 before scale
    torch.testing.assert_close(Additive(str(grey), scale=0.5)(images), (images + (128 / 255 - 0.5)).clamp(0, 1))


def refused(path: Path, match: str, **kwargs: object) -> str:
    with pytest.raises(ValueError, match=match) as error:
        Additive(str(path), **kwargs)  # type: ignore[arg-type]
    message = str(error.value)
    assert "\n" not in message and str(path.name) in message
    return message


def test_additive_refuses_pickles_nan_and_bad_shapes_in_one_line(tmp_path: Path) -> None:
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    refused(objects, "as a plain .npy array")
    pickled = tmp_path / "pickled.npy"  # a raw pickle under a .npy name: never unpickled
    pickled.write_bytes(pickle.dumps({"payload": 1}))
    refused(pickled, "as a plain .npy array")
    nan = np.zeros((3, 32, 32), dtype=np.float32)
    nan[1, 2, 3] = np.nan
    refused(Path(save_delta(tmp_path / "nan.npy", nan)), "NaN or infinite")
    refused(Path(save_delta(tmp_path / "four_d.npy", np.zeros((1, 3, 32, 32)))), r"has shape \(1, 3, 32, 32\)")
    refused(Path(save_delta(tmp_path / "five.npy", np.zeros((5, 32, 32)))), r"has shape \(5, 32, 32\)")
    refused(Path(save_delta(tmp_path / "text.npy", np.array(["a", "b"]))), "not numbers")
    refused(tmp_path / "missing.npy", "does not exist")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    refused(tmp_path / "junk.png", "cannot read")
    refused(Path(save_delta(tmp_path / "bytes.npy", np.full((3, 32, 32), 8, dtype=np.uint8))), "scale = 1/255")
    assert Additive(str(tmp_path / "bytes.npy"), scale=1 / 255).scale == 1 / 255  # 0-255 units with scale 1/255


def test_additive_check_refuses_another_image_shape(delta_32: str) -> None:
    trigger = Additive(delta_32)
    trigger.check((3, 32, 32))
    for shape in ((3, 28, 28), (1, 32, 32)):
        with pytest.raises(ValueError, match=r"is 3x32x32 \(C x H x W\) but the images are") as error:
            trigger.check(shape)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="but the images are 3x28x28"):
        trigger(torch.zeros(2, 3, 28, 28))


@pytest.mark.parametrize("kwargs, match", [({"scale": 0.0}, "scale must be"), ({"epsilon": 0.0}, "epsilon")])
def test_additive_bad_arguments_raise(delta_32: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Additive(delta_32, **kwargs)
