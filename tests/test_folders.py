"""Image folders: every format torchvision's ImageFolder reads, one channel count and size for the whole data set,
hidden and junk entries skipped and counted, unreadable files and disagreeing class folders refused in one line
naming them, and a decoded cache that a changed folder never reuses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_backdoor.data import read_image_folder
from lightning_backdoor.data.sources import load_source

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)  # 30 colours: a GIF's palette holds them exactly
GREY = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
ROWS, COLUMNS = np.meshgrid(np.arange(0, 64, 4), np.arange(0, 64, 4), indexing="ij")
SMOOTH = np.stack([ROWS, COLUMNS, np.full((16, 16), 128)], -1).astype(np.uint8)  # JPEG keeps it within ~3 levels


def save(path: Path, pixels: np.ndarray | Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image.save(path, **kwargs)
    return path


def chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels if pixels.ndim == 3 else pixels[:, :, None]).permute(2, 0, 1)


def one_line_error(match: str, function, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        function(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("suffix, pixels, kwargs, tolerance", [
    (".png", RGB, {}, 0), (".ppm", RGB, {}, 0), (".pgm", GREY, {}, 0), (".bmp", RGB, {}, 0), (".tiff", RGB, {}, 0),
    (".tif", GREY, {}, 0), (".webp", RGB, {"lossless": True}, 0), (".gif", RGB, {}, 0), (".BMP", RGB, {}, 0),
    (".jpg", SMOOTH, {"quality": 95}, 12), (".jpeg", SMOOTH, {"quality": 95}, 12),  # swapped R and B: >= 68
])
def test_every_format_is_read(tmp_path, suffix, pixels, kwargs, tolerance):
    save(tmp_path / "a" / f"one{suffix}", pixels, **kwargs)
    save(tmp_path / "b" / f"two{suffix}", pixels[::-1].copy(), **kwargs)
    images = read_image_folder(tmp_path)
    assert images.classes == ("a", "b") and images.labels.tolist() == [0, 1]
    assert images.images.dtype == torch.uint8 and images.images.shape == (2, *chw(pixels).shape)
    difference = (images.images[0].int() - chw(pixels).int()).abs().max().item()
    assert difference <= tolerance


def test_gif_reads_its_first_frame(tmp_path):
    frames = [Image.fromarray(RGB), Image.fromarray(255 - RGB)]
    save(tmp_path / "a" / "moving.gif", frames[0], save_all=True, append_images=frames[1:])
    assert torch.equal(read_image_folder(tmp_path).images[0], chw(RGB))


def test_same_labels_and_pixels_as_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    for index, name in enumerate(["dog", "cat", "ant"]):
        for copy in range(2):
            save(tmp_path / name / f"{copy}.png", np.roll(RGB, index + copy, axis=0))
    ours, theirs = read_image_folder(tmp_path), ImageFolder(str(tmp_path))
    assert ours.classes == tuple(theirs.classes) and ours.labels.tolist() == theirs.targets
    for image, (pil, _) in zip(ours.images, theirs):
        assert torch.equal(image, chw(np.asarray(pil)))


@pytest.mark.parametrize("first_grey", [True, False])
def test_one_colour_image_makes_the_whole_set_rgb(tmp_path, first_grey):
    grey_class, colour_class = ("a", "b") if first_grey else ("b", "a")
    save(tmp_path / grey_class / "grey.png", GREY)
    save(tmp_path / colour_class / "colour.png", RGB)
    images = read_image_folder(tmp_path)
    assert images.images.shape[1] == 3
    grey = images.images[images.classes.index(grey_class)]
    assert all(torch.equal(grey[channel], torch.from_numpy(GREY)) for channel in range(3))  # R = G = B = grey
    assert torch.equal(images.images[images.classes.index(colour_class)], chw(RGB))


def test_all_greyscale_stays_one_channel_and_channels_overrides(tmp_path):
    save(tmp_path / "a" / "grey.png", GREY)
    save(tmp_path / "b" / "bilevel.png", Image.fromarray(GREY).convert("1"))
    save(tmp_path / "c" / "grey_alpha.png", Image.fromarray(GREY).convert("LA"))
    assert read_image_folder(tmp_path).images.shape == (3, 1, 6, 5)
    assert read_image_folder(tmp_path, channels=3).images.shape == (3, 3, 6, 5)
    save(tmp_path / "d" / "colour.png", RGB)
    as_grey = read_image_folder(tmp_path, channels=1).images
    assert as_grey.shape == (4, 1, 6, 5)
    assert torch.equal(as_grey[3], chw(np.asarray(Image.fromarray(RGB).convert("L"))))
    one_line_error("channels=2 is not supported", read_image_folder, tmp_path, channels=2)


TRANSPARENT = Image.fromarray(np.concatenate([RGB, np.zeros((6, 5, 1), np.uint8)], axis=2))  # RGBA, alpha 0


@pytest.mark.parametrize("mode, suffix, stored, expected", [
    ("RGBA", ".png", TRANSPARENT, RGB),  # alpha dropped, the stored colours kept
    ("P", ".png", Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE), RGB),  # palette expanded
    ("CMYK", ".tiff", Image.fromarray(RGB).convert("CMYK"), np.asarray(Image.fromarray(RGB).convert("CMYK")
                                                                       .convert("RGB"))),
    ("LA", ".png", Image.fromarray(GREY).convert("LA"), np.repeat(GREY[:, :, None], 3, axis=2)),  # next to RGB
])
def test_other_modes_are_converted(tmp_path, mode, suffix, stored, expected):
    save(tmp_path / "a" / f"image{suffix}", stored)
    save(tmp_path / "b" / "reference.png", RGB)
    with Image.open(tmp_path / "a" / f"image{suffix}") as reopened:
        assert reopened.mode == mode
    assert torch.equal(read_image_folder(tmp_path).images[0], chw(expected))


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 128, 65280]], dtype=np.uint16)
    save(tmp_path / "a" / "deep.png", values)
    assert read_image_folder(tmp_path).images[0, 0].tolist() == [[0, 1, 128], [255, 0, 254]]


def test_mixed_sizes_need_image_size(tmp_path):
    small = save(tmp_path / "a" / "small.png", RGB)
    large = save(tmp_path / "b" / "large.png", SMOOTH)
    message = one_line_error("images differ in size", read_image_folder, tmp_path)
    assert str(small) in message and str(large) in message and "6x5" in message and "image_size=" in message
    resized = read_image_folder(tmp_path, image_size=8).images
    assert resized.shape == (2, 3, 8, 8)
    solid = save(tmp_path / "c" / "solid.png", np.full((12, 7, 3), 200, np.uint8))
    assert (read_image_folder(tmp_path, image_size=4).images[2] == 200).all() and solid.exists()


def test_splits_of_different_sizes_need_image_size(tmp_path):
    save(tmp_path / "train" / "a" / "x.png", RGB)
    save(tmp_path / "test" / "a" / "y.png", SMOOTH)
    one_line_error("images differ in size: .*train.*x.png is 6x5 but .*test.*y.png is 16x16", load_source,
                   "imagefolder", str(tmp_path))
    train, test = load_source("imagefolder", str(tmp_path), image_size=10)
    assert train.images.shape[1:] == test.images.shape[1:] == (3, 10, 10)


def test_channels_are_decided_over_both_splits(tmp_path):
    save(tmp_path / "train" / "a" / "x.png", GREY)
    save(tmp_path / "test" / "a" / "y.png", RGB)
    train, test = load_source("imagefolder", str(tmp_path))
    assert train.images.shape[1] == test.images.shape[1] == 3


JUNK = {  # entry -> what creates it; each would change the classes, the labels or fail decoding if read
    "hidden_folder": lambda root: save(root / ".ipynb_checkpoints" / "a-checkpoint.png", RGB),
    "hidden_folder_in_class": lambda root: save(root / "a" / ".thumbnails" / "t.png", SMOOTH),
    "apple_double": lambda root: (root / "a" / "._one.png").write_bytes(b"\x00\x05\x16\x07 resource fork"),
    "ds_store": lambda root: (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1"),
    "ds_store_in_class": lambda root: (root / "b" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1"),
    "notes": lambda root: (root / "a" / "notes.txt").write_text("labelled by hand\n"),
    "thumbs_db": lambda root: (root / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0"),
    "top_level_file": lambda root: (root / "README.md").write_text("my data\n"),
    "macosx_folder": lambda root: (root / "__MACOSX" / "a" / "._one.png").parent.mkdir(parents=True),
}


def clean_folder(root: Path) -> Path:
    save(root / "a" / "one.png", RGB)
    save(root / "b" / "two.png", RGB[::-1].copy())
    return root


@pytest.mark.parametrize("junk", JUNK)
def test_hidden_and_non_image_entries_are_skipped_and_counted(tmp_path, monkeypatch, junk):
    messages: list[str] = []
    monkeypatch.setattr("lightning.pytorch.utilities.rank_zero_info", messages.append)
    expected = read_image_folder(clean_folder(tmp_path / "clean"))
    assert messages == []
    JUNK[junk](clean_folder(tmp_path / "dirty"))
    images = read_image_folder(tmp_path / "dirty")
    assert images.classes == expected.classes and torch.equal(images.labels, expected.labels)
    assert torch.equal(images.images, expected.images)
    assert len(messages) == 1 and f"{tmp_path / 'dirty'}/: skipped 1 hidden or non-image files" in messages[0]


def test_skipped_entries_are_counted_once_per_folder(tmp_path, monkeypatch):
    messages: list[str] = []
    monkeypatch.setattr("lightning.pytorch.utilities.rank_zero_info", messages.append)
    for split in ("train", "test"):
        clean_folder(tmp_path / split)
    for make in (JUNK["hidden_folder"], JUNK["apple_double"], JUNK["notes"]):
        make(tmp_path / "train")
    train, test = load_source("imagefolder", str(tmp_path))
    assert train.classes == test.classes == ("a", "b")
    assert messages == [f"data: {tmp_path / 'train'}/: skipped 3 hidden or non-image files "
                        f"(e.g. '.ipynb_checkpoints', '._one.png', 'notes.txt')"]


@pytest.mark.parametrize("name, content", [
    ("garbage.png", b"this is not a picture"),
    ("empty.jpg", b""),
    ("truncated.png", "png"),
    ("truncated.jpg", "jpeg"),
    ("text_as_bmp.bmp", b"BM but not really a bitmap"),
])
def test_unreadable_file_is_named(tmp_path, name, content):
    clean_folder(tmp_path)
    path = tmp_path / "b" / name
    if isinstance(content, str):
        save(path, SMOOTH)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.write_bytes(content)
    assert f"cannot read image {path}: " in one_line_error("cannot read image", read_image_folder, tmp_path)


def picture(name: str) -> np.ndarray:
    """A picture that differs between classes and is the same for one class in every split."""
    return ((RGB.astype(np.int64) + sum(name.encode())) % 256).astype(np.uint8)


def make_splits(root: Path, train_classes: list[str], test_classes: list[str]) -> Path:
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for name in classes:
            save(root / split / name / f"{split}.png", picture(name))
    return root


@pytest.mark.parametrize("train_classes, test_classes, message", [
    (["bird", "cat", "dog"], ["bird", "dog"], "test/ lacks class 'cat' that .*train/ has"),
    (["bird", "dog"], ["bird", "cat", "dog"], "test/ has class 'cat' that .*train/ lacks"),
    (["bird", "cat"], ["bird", "Cat"], "test/ has class 'Cat' that .*train/ lacks"),
    (["a", "b"], ["c", "d"], "test/ lacks class 'a' that .*train/ has"),
])
def test_split_class_folders_must_agree_by_name(tmp_path, train_classes, test_classes, message):
    one_line_error(message, load_source, "imagefolder", str(make_splits(tmp_path, train_classes, test_classes)))


def test_split_labels_follow_train_class_names_or_an_explicit_order(tmp_path):
    root = make_splits(tmp_path, ["bird", "cat", "dog"], ["dog", "bird", "cat"])
    train, test = load_source("imagefolder", str(root))
    assert train.classes == test.classes == ("bird", "cat", "dog")
    for label in range(3):  # the same class holds the same picture in both splits
        assert torch.equal(train.images[train.labels == label], test.images[test.labels == label])
    train, test = load_source("imagefolder", str(root), classes=["dog", "cat", "bird"])
    assert train.classes == ("dog", "cat", "bird") and train.labels.tolist() == test.labels.tolist() == [2, 1, 0]
    one_line_error("test/ lacks class 'cat' that classes= has", load_source, "imagefolder",
                   str(make_splits(tmp_path / "fewer", ["bird", "cat"], ["bird"])), classes=["bird", "cat"])


def test_read_image_folder_with_classes(tmp_path):
    save(tmp_path / "cat" / "1.png", RGB)
    save(tmp_path / "cat" / "2.png", RGB)
    save(tmp_path / "ship" / "1.png", RGB)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    images = read_image_folder(tmp_path, classes=classes)
    assert images.classes == tuple(classes) and images.labels.tolist() == [3, 3, 8]
    assert images.missing_classes() == tuple(name for name in classes if name not in ("cat", "ship"))
    save(tmp_path / "kitten" / "1.png", RGB)
    message = one_line_error("has class folder 'kitten' that is not one of the 10 classes", read_image_folder,
                             tmp_path, classes=classes)
    assert "'airplane', 'automobile'" in message
    one_line_error("classes lists 'cat' twice", read_image_folder, tmp_path, classes=["cat", "kitten", "cat"])
    one_line_error("must be a non-empty list", read_image_folder, tmp_path, classes="cat")


@pytest.mark.parametrize("contents", [[], ["notes.txt"], [".DS_Store", "._x.png"]])
def test_empty_class_folder_is_named(tmp_path, contents):
    clean_folder(tmp_path)
    (tmp_path / "c").mkdir()
    for name in contents:
        (tmp_path / "c" / name).write_bytes(b"junk")
    one_line_error(f"class folder {tmp_path / 'c'} holds no images", read_image_folder, tmp_path)


@pytest.mark.parametrize("layout, message", [
    ("missing", "data folder .*missing does not exist"),
    ("empty", "data folder .*empty holds no images"),
    ("loose_images", "data folder .*loose_images holds image files but no class folders"),
    ("only_hidden", "data folder .*only_hidden holds no images"),
])
def test_folder_without_images_is_refused(tmp_path, layout, message):
    folder = tmp_path / layout
    if layout != "missing":
        folder.mkdir()
    if layout == "loose_images":
        save(folder / "one.png", RGB)
    if layout == "only_hidden":
        save(folder / ".hidden" / "one.png", RGB)
    one_line_error(message, read_image_folder, folder)


@pytest.mark.parametrize("change", ["add", "remove", "rewrite", "rename"])
def test_cache_is_not_reused_after_the_folder_changes(tmp_path, change):
    root, cache = make_splits(tmp_path / "data", ["a", "b"], ["a", "b"]), tmp_path / "cache"
    train, _ = load_source("imagefolder", str(root), cache_dir=str(cache))
    assert len(train) == 2 and len(list(cache.iterdir())) == 1
    again, _ = load_source("imagefolder", str(root), cache_dir=str(cache))  # unchanged: the cached tensors
    assert torch.equal(again.images, train.images) and len(list(cache.iterdir())) == 1
    target = root / "train" / "b" / "train.png"
    if change == "add":
        save(root / "train" / "b" / "more.png", RGB)
    elif change == "remove":
        save(root / "train" / "a" / "more.png", RGB)
        train, _ = load_source("imagefolder", str(root), cache_dir=str(cache))
        (root / "train" / "a" / "more.png").unlink()
    elif change == "rewrite":  # a later edit: the key holds mtimes, so an edit within one clock tick could pass
        mtime_ns = target.stat().st_mtime_ns
        save(target, 255 - RGB)
        os.utime(target, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    else:
        target.rename(target.with_name("renamed.png"))
    changed, _ = load_source("imagefolder", str(root), cache_dir=str(cache))
    expected = read_image_folder(root / "train")
    assert torch.equal(changed.images, expected.images) and torch.equal(changed.labels, expected.labels)
    assert not torch.equal(changed.images, train.images) or change == "rename"
    assert len(list(cache.iterdir())) >= 2
