"""Image folders read lazily: labels from the folder listing, images decoded per sample by DataLoader workers and
poisoned on the fly by the same :class:`~lightning_backdoor.data.poisoning.SplitPlan` as the in-memory path.

Memory held is the listing (a path and a label per file, packed into flat arrays so forked workers do not copy
them), not the images. Deterministic triggers give the bytes the in-memory path gives (the same decoding, the same
trigger on one image instead of a chunk of images); the random parts of a trigger's *training* application
(Adaptive-Blend's pieces, WaNet's and Adaptive-Blend's noise mode) come from a generator per sample, seeded from
(seed, stream, index into the pool) by :func:`sample_generator`, so they repeat for a seed but differ from the
in-memory path's, which draws them for the whole poisoned batch from one generator.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_backdoor.data.folders import (FLOAT_PIXELS, GREY_MODES, FolderListing, ImageFile, UnreadableImageError,
                                             check_geometry, decode_image, list_split_folders)
from lightning_backdoor.data.imageset import ImageSet
from lightning_backdoor.data.poisoning import SplitPlan, to_float, to_uint8
from lightning_backdoor.triggers import Trigger

#: :func:`sample_generator` streams, the offsets the in-memory path adds to the seed for the same draws
TRAINING_STREAM, NOISE_STREAM = 2, 1
#: files whose headers one thread reads in one go while scanning
_SCAN_CHUNK = 1024


def sample_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one sample's random trigger parts: seeded from BLAKE2b of (seed, stream, index).

    A hash, not ``seed * big + index``: torch's CPU generator keeps only the low 32 bits of its seed, so a sum
    would give every seed the same draws for a given index."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


class PathTable:
    """File paths packed into one byte buffer and an offsets array: indexable like a list, but a forked DataLoader
    worker reading it does not touch (and so copy) one Python object per file."""

    def __init__(self, paths: Sequence[Path]) -> None:
        encoded = [os.fsencode(path) for path in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(item) for item in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> Path:
        return Path(os.fsdecode(self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes()))


@dataclass(frozen=True)
class HeaderScan:
    """What the headers of a run of image files say, without decoding them.

    Attributes:
        colour: whether any file is in a colour mode (not one of :data:`~lightning_backdoor.data.folders.GREY_MODES`).
        first: the first file.
        size: its (width, height), in pixels.
        other_size: the first file of another size and its (width, height), or ``None`` when all agree.
    """

    colour: bool
    first: Path
    size: tuple[int, int]
    other_size: tuple[Path, tuple[int, int]] | None

    def merged(self, later: HeaderScan) -> HeaderScan:
        """This scan followed by ``later`` (the next run of files)."""
        if self.other_size is not None:
            other = self.other_size
        else:
            other = (later.first, later.size) if later.size != self.size else later.other_size
        return HeaderScan(self.colour or later.colour, self.first, self.size, other)


def scan_headers(files: Sequence[ImageFile], threads: int = 8) -> HeaderScan:
    """Open every file's header (Pillow reads a few kB; nothing is decoded) on ``threads`` threads.

    Raises:
        UnreadableImageError: (one line) the first file, in order, Pillow cannot identify as an image, or whose
            pixels are floating-point (mode F, refused as in memory).
    """
    chunks = [files[start:start + _SCAN_CHUNK] for start in range(0, len(files), _SCAN_CHUNK)]
    with ThreadPoolExecutor(max(1, min(threads, len(chunks)))) as pool:
        scans = list(pool.map(_scan_chunk, chunks))
    total = scans[0]
    for scan in scans[1:]:
        total = total.merged(scan)
    return total


def _scan_chunk(files: Sequence[ImageFile]) -> HeaderScan:
    colour, first_size, other = False, (0, 0), None
    for file in files:
        try:
            with Image.open(file.path) as image:
                mode, size = image.mode, image.size
        except Exception as error:  # Pillow's plugins raise many kinds on malformed headers
            reason = "not an image file Pillow can read" if isinstance(error, Image.UnidentifiedImageError) else error
            line = str(reason).strip().splitlines()
            raise UnreadableImageError(f"cannot read image {file.path}: {line[0] if line else type(reason).__name__}")
        if mode == "F":  # refused at decoding anyway: say so now, not mid-run
            raise UnreadableImageError(f"cannot read image {file.path}: {FLOAT_PIXELS}")
        colour = colour or mode not in GREY_MODES
        if file is files[0]:
            first_size = size
        elif other is None and size != first_size:
            other = (file.path, size)
    return HeaderScan(colour, files[0].path, first_size, other)


class FolderStream:
    """One ImageFolder split read lazily: ``labels`` from the listing, images decoded on request.

    Has what the data module reads from an in-memory :class:`~lightning_backdoor.data.ImageSet` (``labels``,
    ``classes``, ``image_shape``, ``subset``, ``len``) except ``images``.

    Args:
        listing: the split's files (``list_image_folder``).
        classes: class names, labels index into them.
        channels: 1 or 3: every image is converted to it.
        image_size, center_crop: as :func:`~lightning_backdoor.data.folders.decode_image`'s.
        size: (height, width) of every decoded image, in pixels.
    """

    def __init__(self, listing: FolderListing, classes: tuple[str, ...], channels: int, image_size: int | None,
                 center_crop: int | None, size: tuple[int, int]) -> None:
        index = {name: label for label, name in enumerate(classes)}
        self.folder, self.classes = listing.folder, classes
        self.labels = torch.tensor([index[file.class_name] for file in listing.files], dtype=torch.int64)
        self.paths = PathTable([file.path for file in listing.files])
        self.channels, self.image_size, self.center_crop = channels, image_size, center_crop
        self.image_shape: tuple[int, int, int] = (channels, *size)
        self._kept: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def decode(self, index: int) -> Tensor:
        """Image ``index`` as uint8 ``(C, H, W)``.

        Raises:
            UnreadableImageError: (one line naming the file) it cannot be decoded, or decodes to another size.
        """
        path = self.paths[index]
        pixels = decode_image(path, self.channels, self.image_size, self.center_crop)
        if pixels.shape[:2] != self.image_shape[1:]:
            raise UnreadableImageError(f"cannot read image {path}: it decodes to {pixels.shape[0]}x{pixels.shape[1]} "
                                       f"pixels, not the {self.image_shape[1]}x{self.image_shape[2]} its header said")
        return torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy()).permute(2, 0, 1).contiguous()

    def subset(self, indices: Tensor, threads: int = 8) -> ImageSet:
        """Images ``indices`` decoded into an in-memory ImageSet (on ``threads`` threads: Pillow decodes without the
        GIL). Decoded images are kept for the next call: this is for small parts such as the unseen split."""
        wanted = [int(index) for index in indices]
        missing = sorted(set(wanted) - self._kept.keys())
        with ThreadPoolExecutor(max(1, threads)) as pool:
            self._kept.update(zip(missing, pool.map(self.decode, missing)))
        images = torch.stack([self._kept[index] for index in wanted]) if wanted else \
            torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return ImageSet(images, self.labels[indices], self.classes)


def open_folder_streams(root: str | os.PathLike, image_size: int | None,
                        center_crop: int | None) -> tuple[FolderStream, FolderStream]:
    """``root/train`` and ``root/test`` as FolderStreams, checked as far as can be without decoding.

    Lists both splits (their class folders must agree), then reads every file's header: the channel count is 3 if
    any image has colour, else 1, as in the in-memory path; without ``image_size`` or ``center_crop`` every image
    must have the first one's size.

    Raises:
        ValueError: (one line) what ``list_split_folders`` refuses, a bad ``image_size``/``center_crop``, a file
            Pillow cannot identify or of floating-point pixels (named), two files of different sizes without
            resizing (both named).
    """
    check_geometry(image_size, center_crop)
    (train, test), classes = list_split_folders(root, None)
    scan = scan_headers(train.files + test.files)
    if center_crop is not None:
        size = (center_crop, center_crop)
    elif image_size is not None:
        size = (image_size, image_size)
    else:
        if scan.other_size is not None:
            path, (width, height) = scan.other_size
            raise ValueError(f"images differ in size: {train.files[0].path} is {scan.size[1]}x{scan.size[0]} but "
                             f"{path} is {height}x{width} (height x width); set image_size=<pixels> to resize them "
                             f"all to one square size")
        size = (scan.size[1], scan.size[0])
    channels = 3 if scan.colour else 1
    return tuple(FolderStream(listing, classes, channels, image_size, center_crop, size)  # type: ignore[return-value]
                 for listing in (train, test))


class PoisonedStream(Dataset):
    """The training split of a FolderStream, poisoned on the fly: ``(image uint8 (C, H, W), label int64)``.

    Sample ``i`` is pool image ``plan.train[i]``; a poisoned one carries
    :meth:`~lightning_backdoor.triggers.Trigger.apply_for_training` and its attack label (its true label for a
    clean-label attack), a noise-mode one :meth:`~lightning_backdoor.triggers.Trigger.apply_noise` and its true
    label, the random parts from :func:`sample_generator` (``seed``, :data:`TRAINING_STREAM` or
    :data:`NOISE_STREAM`, pool index).

    Args:
        pool: the training pool.
        plan: the split plan drawn on ``pool.labels``.
        trigger: the attack's trigger.
        labels: the training labels, ``(len(plan.train),)`` int64, poisoned ones already relabelled.
        seed: the data module's seed.
    """

    def __init__(self, pool: FolderStream, plan: SplitPlan, trigger: Trigger, labels: Tensor, seed: int) -> None:
        self.pool, self.trigger, self.seed = pool, trigger, seed
        self.indices, self.labels = plan.train, labels
        self.roles = torch.zeros(len(plan.train), dtype=torch.int8)  # 0 clean, 1 poisoned, 2 noise mode
        self.roles[torch.isin(plan.train, plan.poisoned)] = 1
        self.roles[torch.isin(plan.train, plan.noise)] = 2

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor]:
        index = int(self.indices[item])
        image = self.pool.decode(index)
        role = int(self.roles[item])
        if role == 1:
            generator = sample_generator(self.seed, TRAINING_STREAM, index)
            image = to_uint8(self.trigger.apply_for_training(to_float(image[None]), generator))[0]
        elif role == 2:
            generator = sample_generator(self.seed, NOISE_STREAM, index)
            image = to_uint8(self.trigger.apply_noise(to_float(image[None]), generator))[0]
        return image, self.labels[item]


class TriggeredStream(Dataset):
    """Evaluation samples of a FolderStream: ``(image, label, triggered image, attack label)``, images uint8
    ``(C, H, W)``, the trigger (:meth:`~lightning_backdoor.triggers.Trigger.apply`, deterministic) applied on the fly.

    Args:
        stream: the split.
        indices: which of its images, ``(N,)`` int64.
        trigger: the attack's trigger.
        attack_labels: ``(N,)`` int64, the label the attack wants for each (``-1``: not attacked).
    """

    def __init__(self, stream: FolderStream, indices: Tensor, trigger: Trigger, attack_labels: Tensor) -> None:
        self.stream, self.indices, self.trigger = stream, indices, trigger
        self.labels, self.attack_labels = stream.labels[indices], attack_labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        image = self.stream.decode(int(self.indices[item]))
        triggered = to_uint8(self.trigger(to_float(image[None])))[0]
        return image, self.labels[item], triggered, self.attack_labels[item]

    def tensors(self, batch_size: int, num_workers: int) -> TensorDataset:
        """Every sample decoded into a TensorDataset (``batch_size`` at a time on ``num_workers`` DataLoader
        workers), laid out as the in-memory path's: for callers that need the tensors (the defense's evaluation)."""
        images, triggered = (torch.empty((0, *self.stream.image_shape), dtype=torch.uint8) for _ in range(2))
        parts = [(images, self.labels[:0], triggered, self.attack_labels[:0])]
        parts += list(DataLoader(self, batch_size=batch_size, num_workers=num_workers))
        return TensorDataset(*(torch.cat(column) for column in zip(*parts)))
