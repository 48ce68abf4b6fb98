"""ImageFolder trees (``folder/<class>/<image files>``) decoded with Pillow into uint8 ImageSets.

Reads the formats torchvision's ImageFolder reads (JPEG, PNG, PPM/PGM/PBM, BMP, TIFF, WebP) and GIF (first frame).
Hidden entries (names starting with ``.``, e.g. ``.ipynb_checkpoints``, ``.DS_Store``, macOS ``._name.png``),
``__MACOSX`` folders and files without an image suffix (``notes.txt``, ``Thumbs.db``) are skipped and counted in one
info line per folder. Every image is converted to one channel count: greyscale (1 channel) when every image of the
data set is greyscale (PIL modes 1, L, LA, I, I;16), RGB (3 channels) otherwise, or the ``channels`` asked for.
Conversions follow PIL's ``convert``: greyscale is repeated into R = G = B, palette and CMYK images become RGB, and an
alpha channel is dropped (transparent pixels keep their stored colour; nothing is composited), and ``channels=1``
turns colour into PIL's luma L = (299 R + 587 G + 114 B) / 1000. 16-bit greyscale is scaled to 8 bits
(v * 255 / 65535, rounded); floating-point images are refused. EXIF orientation is not applied (as torchvision).

Sizes: kept (they must then all agree), resized square (``image_size``), or, with ``center_crop``, resized so the
shorter side is ``image_size`` pixels (aspect kept) and centre-cropped to ``center_crop`` square, as torchvision's
evaluation transform ``Resize(image_size)`` + ``CenterCrop(center_crop)`` does on a PIL image (the same pixels: PIL's
bilinear resize).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_backdoor.data.imageset import ImageSet, resize_square

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
#: PIL modes read as greyscale; any other mode makes the data set RGB (unless ``channels`` says otherwise).
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
#: why an image of floating-point pixels (PIL mode F, e.g. a 32-bit float TIFF) is refused
FLOAT_PIXELS = "floating-point pixels (PIL mode F) are not supported; save it with 8 bits per channel"
_JUNK_FOLDERS = frozenset({"__MACOSX"})


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; the message is one line, ``cannot read image <path>: <reason>``.

    A DataLoader worker's error comes back to the main process as ``type(error)(worker's traceback text)``; the
    message is cut back here to its last ``cannot read image`` line, so a file that fails while streaming is still
    reported in one line naming it.
    """

    def __init__(self, message: str) -> None:
        start = message.rfind("cannot read image ")
        super().__init__(message[start:].splitlines()[0] if start >= 0 else message)


@dataclass(frozen=True)
class ImageFile:
    """One image file of a folder: its path, its class folder's name, its size in bytes and mtime in nanoseconds."""

    path: Path
    class_name: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FolderListing:
    """What one ImageFolder split holds, before decoding.

    Attributes:
        folder: the split's folder.
        classes: names of its class folders, sorted.
        files: its image files, sorted by class then path (subfolders of a class folder included).
        skipped: hidden or non-image entries left out (a hidden folder counts once, its contents not listed).
    """

    folder: Path
    classes: tuple[str, ...]
    files: tuple[ImageFile, ...]
    skipped: tuple[Path, ...]

    def fingerprint(self) -> str:
        """A hash of every image file's relative path, size and mtime: changes when any file is added, removed,
        renamed or rewritten (a rewrite keeping the size within one filesystem clock tick goes unseen, as in git)."""
        digest = hashlib.sha1()
        for file in self.files:
            digest.update(f"{file.path.relative_to(self.folder)}\0{file.size}\0{file.mtime_ns}\n".encode())
        return digest.hexdigest()


def list_image_folder(folder: str | os.PathLike) -> FolderListing:
    """List ``folder/<class>/<image files>`` and log one info line if anything was skipped.

    Raises:
        ValueError: the folder does not exist, holds no class folder, or a class folder holds no image.
    """
    folder = Path(folder)
    expected = f"expected {folder}/<class>/<image files>"
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist; {expected}")
    classes: list[str] = []
    skipped: list[Path] = []
    loose_images = 0
    for entry in _sorted_entries(folder):
        if _is_junk(entry.name):
            skipped.append(Path(entry.path))
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            skipped.append(Path(entry.path))
            loose_images += _is_image_name(entry.name)
    if not classes:
        holds = "image files but no class folders" if loose_images else "no images"
        raise ValueError(f"data folder {folder} holds {holds}; {expected}")
    files: list[ImageFile] = []
    for name in classes:
        found = _walk(folder / name, name, skipped)
        if not found:
            raise ValueError(f"class folder {folder / name} holds no images; add images or remove the folder "
                             f"(image suffixes: {', '.join(IMAGE_SUFFIXES)})")
        files += found
    if skipped:
        from lightning.pytorch.utilities import rank_zero_info  # imported here: reading images needs no Lightning

        examples = ", ".join(repr(name) for name in list(dict.fromkeys(path.name for path in skipped))[:3])
        rank_zero_info(f"data: {folder}/: skipped {len(skipped)} hidden or non-image files (e.g. {examples})")
    return FolderListing(folder, tuple(classes), tuple(files), tuple(skipped))


def read_image_folder(
    folder: str | os.PathLike, *, classes: Sequence[str] | None = None, channels: int | None = None,
    image_size: int | None = None, center_crop: int | None = None,
) -> ImageSet:
    """Decode one ImageFolder split, e.g. a defender's own clean images (any number per class >= 1).

    Args:
        folder: holds ``<class>/<image files>``.
        classes: the class names labels index into (e.g. the model's training classes). Every class folder must
            be one of them; classes without a folder are allowed: ``ImageSet.missing_classes()`` names them, and a
            caller that needs every class checks it. Default: the sorted class folder names.
        channels: 1 or 3 to convert every image to; default: 1 if all images are greyscale, else 3.
        image_size: resize every image to this many pixels square (the shorter side, with ``center_crop``);
            default: keep sizes, which must all agree (``center_crop``'s value, with ``center_crop``).
        center_crop: after resizing the shorter side to ``image_size``, keep the central ``center_crop`` x
            ``center_crop`` pixels (torchvision's ``Resize`` + ``CenterCrop``).

    Returns:
        ImageSet with images ``(N, channels, H, W)`` uint8, labels ``(N,)`` indices into ``classes``.

    Raises:
        ValueError: (one line) a missing or empty folder, a class folder not in ``classes``, an unreadable image
            (named), images of different sizes without ``image_size``, a bad ``classes``, ``channels``,
            ``image_size`` or ``center_crop``.
    """
    listing = list_image_folder(folder)
    names = listing.classes if classes is None else _checked_classes(classes)
    unknown = next((name for name in listing.classes if name not in names), None)
    if unknown is not None:
        raise ValueError(f"{listing.folder}/ has class folder '{unknown}' that is not one of the {len(names)} "
                         f"classes ({_few(names)})")
    return read_listings((listing,), names, channels, image_size, center_crop)[0]


def list_split_folders(
    root: str | os.PathLike, classes: Sequence[str] | None = None,
) -> tuple[tuple[FolderListing, FolderListing], tuple[str, ...]]:
    """List ``root/train`` and ``root/test`` and check that their class folders agree by name.

    Returns:
        ((train listing, test listing), class names): ``classes`` if given, else train's sorted class folders.

    Raises:
        ValueError: (one line) a split folder is missing or empty, or the first class that differs between the
            splits (or between a split and ``classes``), named.
    """
    train, test = (list_image_folder(Path(root) / split) for split in ("train", "test"))
    if classes is None:
        names = train.classes
        _check_same_classes(test, names, f"{train.folder}/")
    else:
        names = _checked_classes(classes)
        for listing in (train, test):
            _check_same_classes(listing, names, "classes=")
    return (train, test), names


@functools.lru_cache(maxsize=4)
def read_listings(
    listings: tuple[FolderListing, ...], classes: tuple[str, ...], channels: int | None, image_size: int | None,
    center_crop: int | None = None,
) -> tuple[ImageSet, ...]:
    """Decode listed folders into ImageSets sharing one channel count and one image size.

    Args:
        listings: from ``list_image_folder``; their class names must all be in ``classes`` (labels index it).
        classes, channels, image_size, center_crop: as ``read_image_folder``'s.

    Cached per process (the returned tensors are shared: do not modify them in place); a listing holds every file's
    size and mtime, so a changed folder is decoded anew.

    Raises:
        ValueError: (one line) an unreadable image (named), two images of different sizes (both named) without
            ``image_size``, ``channels`` not 1 or 3, ``image_size`` or ``center_crop`` < 1, ``center_crop`` larger
            than ``image_size``.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels} is not supported; use 1 (greyscale) or 3 (RGB)")
    check_geometry(image_size, center_crop)
    files = [file for listing in listings for file in listing.files]
    images = [decode_image(file.path, channels, image_size, center_crop) for file in files]
    channels = channels or max(image.shape[2] for image in images)
    if image_size is None and center_crop is None:
        _check_same_size(images, files)
    index = {name: label for label, name in enumerate(classes)}
    out, start = [], 0
    for listing in listings:
        stop = start + len(listing.files)
        height, width = images[start].shape[:2]
        stacked = np.stack([np.broadcast_to(image, (height, width, channels)) for image in images[start:stop]])
        labels = torch.tensor([index[file.class_name] for file in listing.files], dtype=torch.int64)
        out.append(ImageSet(torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(), labels, classes))
        start = stop
    return tuple(out)


def check_geometry(image_size: int | None, center_crop: int | None) -> None:
    """Raise a one-line ``ValueError`` for an ``image_size`` or ``center_crop`` below 1 pixel, or a crop larger than
    the shorter side it is cut from."""
    for name, value in (("image_size", image_size), ("center_crop", center_crop)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be >= 1 pixel")
    if center_crop is not None and image_size is not None and center_crop > image_size:
        raise ValueError(f"center_crop={center_crop} is larger than image_size={image_size}, the shorter side it is "
                         f"cut from; use image_size >= center_crop (e.g. 256 and 224)")


def decode_image(path: Path, channels: int | None, image_size: int | None,
                 center_crop: int | None = None) -> np.ndarray:
    """One image file as uint8 ``(H, W, C)``: C = ``channels``, or 1 for greyscale and 3 for other files; H = W =
    ``image_size`` when given, or ``center_crop`` when given (the shorter side resized to ``image_size``, default
    ``center_crop``, then the centre cut out: :func:`resize_and_center_crop`).

    Raises:
        UnreadableImageError: (a ``ValueError``, one line naming ``path``) the file cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            image.load()
            converted = _converted(image, channels)
            if center_crop is not None:
                converted = resize_and_center_crop(converted, image_size or center_crop, center_crop)
            pixels = np.asarray(converted)  # a copy, taken before the file closes
    except Exception as error:  # Pillow's plugins raise many kinds on malformed files; each means "unreadable"
        reason = "not an image file Pillow can read" if isinstance(error, Image.UnidentifiedImageError) else error
        raise UnreadableImageError(f"cannot read image {path}: {_first_line(reason)}") from None
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    if image_size is None or center_crop is not None or pixels.shape[:2] == (image_size, image_size):
        return pixels
    return resize_square(torch.from_numpy(pixels.copy()).permute(2, 0, 1), image_size).permute(1, 2, 0).numpy()


def resize_and_center_crop(image: Image.Image, size: int, crop: int) -> Image.Image:
    """Resize ``image`` so its shorter side is ``size`` pixels (the longer one ``int(size * long / short)``, PIL's
    bilinear filter), then keep its central ``crop`` x ``crop`` pixels (offsets rounded half to even): the pixels
    torchvision's ``Resize(size)`` + ``CenterCrop(crop)`` give for a PIL image. ``crop`` <= ``size``."""
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    top, left = int(round((new_height - crop) / 2.0)), int(round((new_width - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def _converted(image: Image.Image, channels: int | None) -> Image.Image:
    """An opened image in mode ``L`` or ``RGB`` (see ``decode_image``)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"mode {image.mode} pixels outside 0..65535")
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError(FLOAT_PIXELS)
    if channels is None:
        target = "L" if image.mode in GREY_MODES else "RGB"
    else:
        target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _check_same_size(images: list[np.ndarray], files: list[ImageFile]) -> None:
    first = images[0].shape[:2]
    for image, file in zip(images, files):
        if image.shape[:2] != first:
            raise ValueError(f"images differ in size: {files[0].path} is {first[0]}x{first[1]} but {file.path} is "
                             f"{image.shape[0]}x{image.shape[1]} (height x width); set image_size=<pixels> to resize "
                             f"them all to one square size")


def _check_same_classes(listing: FolderListing, names: tuple[str, ...], where: str) -> None:
    """Raise naming the first class (in sorted order) that ``listing`` lacks or has beyond ``names``."""
    differ = sorted(set(listing.classes) ^ set(names))
    if differ:
        name = differ[0]
        if name in names:
            raise ValueError(f"{listing.folder}/ lacks class '{name}' that {where} has; every split needs the same "
                             f"class folders")
        raise ValueError(f"{listing.folder}/ has class '{name}' that {where} lacks; every split needs the same "
                         f"class folders")


def _checked_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str) or not classes or not all(isinstance(name, str) and name for name in classes):
        raise ValueError(f"classes={classes!r} must be a non-empty list of class names")
    names = tuple(classes)
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise ValueError(f"classes lists '{duplicate}' twice")
    return names


def _walk(directory: Path, class_name: str, skipped: list[Path]) -> list[ImageFile]:
    """Image files under ``directory`` (recursively, following links as torchvision does), in sorted order."""
    found: list[ImageFile] = []
    for entry in _sorted_entries(directory):
        path = Path(entry.path)
        if _is_junk(entry.name):
            skipped.append(path)
        elif entry.is_dir():
            found += _walk(path, class_name, skipped)
        elif _is_image_name(entry.name):
            try:
                stat = entry.stat()
            except OSError as error:
                raise ValueError(f"cannot read image {path}: {error.strerror or error}") from None
            found.append(ImageFile(path, class_name, stat.st_size, stat.st_mtime_ns))
        else:
            skipped.append(path)
    return found


def _sorted_entries(directory: Path) -> list[os.DirEntry]:
    with os.scandir(directory) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_FOLDERS


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _few(names: Sequence[str], shown: int = 10) -> str:
    listed = ", ".join(repr(name) for name in names[:shown])
    return listed + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
