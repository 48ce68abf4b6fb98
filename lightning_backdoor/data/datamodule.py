"""PoisonedDataModule: a source, a trigger and a poisoning plan, with the unseen clean split the defense uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_backdoor.data.augment import random_crop, random_flip
from lightning_backdoor.data.sampling import GlobalBatchSampler
from lightning_backdoor.data.poisoning import (SplitPlan, apply_noise_mode, apply_trigger, apply_training_trigger,
                                               attack_labels, plan_splits, to_float)
from lightning_backdoor.data.sources import ImageSet, load_source
from lightning_backdoor.data.streaming import FolderStream, PoisonedStream, TriggeredStream, open_folder_streams
from lightning_backdoor.io import atomic_json
from lightning_backdoor.provenance import environment
from lightning_backdoor.triggers import BadNets, PreparedTrigger, Trigger

#: the data settings that change what a model's numbers mean: stored in every checkpoint, compared when one loads
#: (in this order: ``all_to_all`` decides whether there is a ``target_class``)
SETTINGS = ("source", "classes", "all_to_all", "target_class", "poison_rate", "clean_label", "trigger", "seed",
            "unseen_per_class")


def differing_setting(saved: Any, current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first of ``current``'s settings that ``saved`` holds with another value, as (name, saved value, current
    value); ``None`` when all agree. Settings ``saved`` lacks (a checkpoint from before they were stored, or a file
    that stores none) are not compared."""
    saved = saved if isinstance(saved, dict) else {}
    for name, value in current.items():
        if name in saved and saved[name] != value:
            return name, saved[name], value
    return None


class PoisonedDataModule(L.LightningDataModule):
    """Poisoned training data, clean validation, clean + triggered test, and an unseen clean split.

    Training batches are ``(images, labels)``; validation and test batches are
    ``(images, labels, triggered_images, attack_labels)``, images float in [0, 1] of shape (N, C, H, W).

    Args:
        source: ``mnist5k`` (bundled, default), ``digits`` (bundled), ``cifar10``, ``mnist``, ``gtsrb`` or
            ``imagefolder``.
        root: folder with ``train/<class>/*`` and ``test/<class>/*`` (ImageFolder layout), or torchvision's root.
        download: let torchvision download the source (needs internet).
        image_size: resize images to this many pixels square (for sources of mixed sizes); with ``center_crop``,
            resize their shorter side to it (default: ``center_crop``), keeping the aspect ratio.
        center_crop: (image folders) then keep the central ``center_crop`` x ``center_crop`` pixels, as torchvision's
            evaluation transform ``Resize(image_size)`` + ``CenterCrop(center_crop)`` (e.g. 256 and 224).
        cache_dir: keep decoded uint8 tensors here so later processes skip decoding, and a trigger made with a model
            (Low Frequency, TrojanNN, Label-Consistent) under ``prepared/`` (without it: in the run folder's
            ``prepared/`` when a Trainer runs the data module).
        streaming: (``imagefolder`` only) decode images per batch in the DataLoader workers instead of all at
            construction, and poison them on the fly with the same plan: for data larger than memory. Labels come
            from the folder listing and every file's header is read at construction (channel count, sizes,
            unreadable headers); a file that fails to decode later is named in a one-line error. The unseen split is
            decoded when first asked for; ``test_dataloader()`` and ``test_samples()`` decode only what they yield,
            ``test_dataset()`` and ``validation_dataset()`` their split whole. Set ``num_workers``. See the data page
            of the docs.
        trigger: the backdoor trigger (default: a 3x3 BadNets patch).
        target_class: the attack's target label (all-to-one). All-to-all has none: the attribute is then ``None``
            (no target-class accuracy anywhere) and a value other than the default 0 is refused.
        poison_rate: fraction of training images that carry the trigger, in [0, 1].
        all_to_all: relabel triggered images to ``(y + 1) mod K`` instead of ``target_class``; the poisoned images
            are drawn from every class, and every class's triggered test images count in the ASR.
        clean_label: poison target-class images only and keep their labels (SIG's setting; Label-Consistent needs
            it).
        unseen_per_class: clean images per class held out before poisoning, never trained on: the defense's data.
        val_fraction: fraction of the remaining training pool kept as clean validation.
        augment: ``auto`` (crop + flip for RGB images of 32 px or more, crop for smaller), ``crop_flip``, ``crop``,
            ``none``. Applied after the trigger, as a real attacker's victim would train.
        batch_size: training batch size; evaluation uses ``eval_batch_size``.
        seed: fixes the unseen split, the validation split, the poisoned indices, the trigger's noise mode and its
            training-time random parts (Adaptive-Blend's pieces).
    """

    def __init__(
        self,
        source: str = "mnist5k",
        root: str | None = None,
        download: bool = False,
        image_size: int | None = None,
        center_crop: int | None = None,
        cache_dir: str | None = None,
        streaming: bool = False,
        trigger: Trigger | None = None,
        target_class: int = 0,
        poison_rate: float = 0.1,
        all_to_all: bool = False,
        clean_label: bool = False,
        unseen_per_class: int = 10,
        val_fraction: float = 0.02,
        augment: Literal["auto", "crop_flip", "crop", "none"] = "auto",
        batch_size: int = 256,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= poison_rate <= 1.0:
            raise ValueError(f"poison_rate={poison_rate} is outside [0, 1]; use e.g. poison_rate=0.1 for 10 %")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} is outside [0, 1)")
        if unseen_per_class < 0:
            raise ValueError(f"unseen_per_class={unseen_per_class} is negative")
        self.trigger = trigger if trigger is not None else BadNets()
        if self.trigger.clean_label_only and not clean_label:
            raise ValueError(f"the {self.trigger.name} trigger is a clean-label attack (it poisons target-class images "
                             f"and keeps their labels); set clean_label=true")
        self.cache_dir = cache_dir
        self.source, self.target_class, self.poison_rate = source, target_class, poison_rate
        self.all_to_all, self.clean_label, self.unseen_per_class = all_to_all, clean_label, unseen_per_class
        self.batch_size, self.eval_batch_size, self.num_workers, self.seed = batch_size, eval_batch_size, num_workers, seed
        self.streaming, self.image_size, self.center_crop = streaming, image_size, center_crop
        self.train_pool, self.test_set = self._open_source(root, download, image_size, cache_dir)
        if not 0 <= target_class < self.num_classes:
            raise ValueError(f"target_class={target_class} is not a class; valid: 0..{self.num_classes - 1} "
                             f"({', '.join(self.classes)})")
        if all_to_all and target_class != 0:
            raise ValueError(f"target_class={target_class} has no meaning with all_to_all=true (class y goes to "
                             f"(y + 1) mod {self.num_classes}); leave target_class at its default")
        self.target_class = None if all_to_all else target_class
        self.trigger.check(self.image_shape)
        self.plan = plan_splits(self.train_pool.labels, self.num_classes, self.target_class, poison_rate,
                                unseen_per_class, val_fraction, clean_label, self.trigger.cross_ratio, seed, all_to_all)
        height = self.image_shape[1]
        if augment == "auto":
            augment = "crop_flip" if self.image_shape[0] == 3 and height >= 32 else "crop"
        self.augment = augment
        self.crop_padding = 0 if augment == "none" else max(1, height // 8)
        self._datasets: dict[str, Dataset] = {}

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train_pool.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return self.train_pool.image_shape

    @property
    def in_channels(self) -> int:
        return self.image_shape[0]

    def unseen_set(self, per_class: int | None = None, seed: int | None = None) -> ImageSet:
        """``per_class`` (default: all) unseen clean images of every class, as uint8: the first ones, or a random
        draw from the unseen split when ``seed`` is given (for repeated trials at a fixed budget)."""
        count = self.unseen_per_class if per_class is None else per_class
        if count < 0:
            raise ValueError(f"asked for {count} unseen images per class: a count must not be negative")
        if count > self.unseen_per_class:
            raise ValueError(f"asked for {count} unseen images per class but the split holds {self.unseen_per_class}")
        grid = self.plan.unseen.view(self.unseen_per_class, self.num_classes)  # row i: the i-th image of each class
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            order = torch.stack([torch.randperm(self.unseen_per_class, generator=generator)
                                 for _ in range(self.num_classes)], dim=1)
            grid = grid.gather(0, order)
        return self.train_pool.subset(grid[:count].flatten())

    def held_out_unseen_set(self, per_class: int, seed: int | None = None) -> ImageSet:
        """The unseen images *not* in ``unseen_set(per_class, seed)``: clean validation for choosing settings."""
        used = self.unseen_set(per_class, seed)
        everything = self.unseen_set(None, seed)
        return everything.subset(torch.arange(len(used), len(everything)))

    def attack_labels(self, labels: Tensor) -> Tensor:
        return attack_labels(labels, self.target_class, self.all_to_all, self.num_classes)

    def prepare_data(self) -> None:
        """Prepare a trigger made with a model once per node, before every rank's :meth:`setup` loads it from the
        cache (:meth:`prepare_trigger`); nothing for other triggers."""
        self.prepare_trigger()

    def prepare_trigger(self) -> None:
        """:meth:`Trigger.prepare` on the training split's clean images (never the unseen, validation or test
        images), cached under :meth:`preparation_dir`; nothing for triggers that need no model. Raises a one-line
        ``ValueError`` when the training images are not decoded in memory (a streamed source)."""
        if not isinstance(self.trigger, PreparedTrigger):
            return
        if not isinstance(self.train_pool, ImageSet):
            raise ValueError(f"the {self.trigger.name} trigger is made with a model trained on the decoded training "
                             f"images; a streamed source does not decode them: use streaming=false")
        train = self.train_pool.subset(self.plan.train)
        self.trigger.prepare(train.images, train.labels, self.target_class, self.num_classes, self.preparation_dir())

    def preparation_dir(self) -> Path | None:
        """Where a prepared trigger is cached: ``<cache_dir>/prepared``, else the Trainer's run folder's
        ``prepared/``, else nowhere (memory only)."""
        if self.cache_dir is not None:
            return Path(self.cache_dir) / "prepared"
        if self.trainer is not None:
            return Path(self.trainer.default_root_dir) / "prepared"
        return None

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        self.prepare_trigger()  # before poisoning and before the test split is triggered
        if self.streaming:
            self._datasets.update(self._streamed_datasets())
            return
        pool, plan = self.train_pool, self.plan
        images, labels = pool.images.clone(), pool.labels.clone()
        images[plan.poisoned] = apply_training_trigger(self.trigger, images[plan.poisoned], self.seed)
        labels[plan.poisoned] = self.attack_labels(labels[plan.poisoned]) if not self.clean_label else labels[plan.poisoned]
        images[plan.noise] = apply_noise_mode(self.trigger, images[plan.noise], self.seed)
        self._datasets["train"] = TensorDataset(images[plan.train], labels[plan.train])
        self._datasets["val"] = self._eval_dataset(pool.subset(plan.val))
        self._datasets["test"] = self._eval_dataset(self.test_set)

    def test_dataset(self) -> TensorDataset:
        """The test split as uint8 images, labels, triggered images and attack labels."""
        self.setup("test")
        return self._in_memory("test")

    def test_samples(self, indices: Tensor) -> list[Tensor]:
        """Test samples ``indices`` ((K,) int64 into the test split) as :meth:`test_dataloader` yields them, stacked:
        images uint8 (K, C, H, W), labels (K,), triggered images uint8 (K, C, H, W), attack labels (K,). When
        streaming only these K files are decoded."""
        self.setup("test")
        dataset = self._datasets["test"]
        if len(indices) == 0:
            images, labels = torch.empty((0, *self.image_shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
            return [images, labels, images.clone(), labels.clone()]
        return [torch.stack(column) for column in zip(*(dataset[int(index)] for index in indices))]

    def validation_dataset(self) -> TensorDataset:
        """The validation split (training-pool images held out of training), laid out as :meth:`test_dataset`: for
        choosing settings without touching the test split."""
        self.setup("test")
        return self._in_memory("val")

    def _open_source(self, root: str | None, download: bool, image_size: int | None,
                     cache_dir: str | None) -> tuple[ImageSet, ImageSet] | tuple[FolderStream, FolderStream]:
        """The (training pool, test split): decoded ImageSets, or with ``streaming`` FolderStreams. Raises a one-line
        ``ValueError`` for ``streaming`` with a source other than ``imagefolder``, with ``cache_dir``, without
        ``root`` or with a trigger made with a model (:class:`PreparedTrigger`)."""
        if not self.streaming:
            return load_source(self.source, root, download, image_size, cache_dir, center_crop=self.center_crop)
        if self.source != "imagefolder":
            raise ValueError(f"streaming=true reads image folders only (source=imagefolder with root=<folder>), not "
                             f"source {self.source!r}, whose images are decoded into memory")
        if cache_dir is not None:
            raise ValueError("streaming=true decodes images per batch; cache_dir keeps every decoded image on disk "
                             "and in memory: use one or the other")
        if root is None:
            raise ValueError("streaming=true needs root=<folder with train/<class>/*.jpg and test/<class>/*.jpg>")
        if isinstance(self.trigger, PreparedTrigger):  # refused here, before minutes of listing, not at setup
            raise ValueError(f"the {self.trigger.name} trigger is made with a model trained on the decoded training "
                             f"images; a streamed source does not decode them: use streaming=false")
        return open_folder_streams(root, image_size, self.center_crop)

    def _streamed_datasets(self) -> dict[str, Dataset]:
        """Training, validation and test datasets that decode and poison per sample (``streaming``)."""
        pool, plan = self.train_pool, self.plan
        labels = pool.labels.clone()
        if not self.clean_label:
            labels[plan.poisoned] = self.attack_labels(labels[plan.poisoned])
        return {"train": PoisonedStream(pool, plan, self.trigger, labels[plan.train], self.seed),
                "val": TriggeredStream(pool, plan.val, self.trigger, self.attack_labels(pool.labels[plan.val])),
                "test": TriggeredStream(self.test_set, torch.arange(len(self.test_set)), self.trigger,
                                        self.attack_labels(self.test_set.labels))}

    def _in_memory(self, name: str) -> TensorDataset:
        """Split ``name``'s TensorDataset; a streamed split is decoded whole once, then kept."""
        dataset = self._datasets[name]
        if isinstance(dataset, TriggeredStream):
            dataset = self._datasets[name] = dataset.tensors(self.eval_batch_size, self.num_workers)
        return dataset  # type: ignore[return-value]

    def _eval_dataset(self, images: ImageSet) -> TensorDataset:
        return TensorDataset(images.images, images.labels, apply_trigger(self.trigger, images.images),
                             self.attack_labels(images.labels))

    def save_splits(self, path: Path) -> None:
        """Write the split indices (into the training pool) and the attack settings as JSON."""
        record = {name: indices.tolist() for name, indices in self.plan.as_dict().items()}
        record |= {"source": self.source, "target_class": self.target_class, "all_to_all": self.all_to_all,
                   "poison_rate": self.poison_rate,
                   "trigger": repr(self.trigger), "seed": self.seed, "classes": list(self.classes)}
        atomic_json(record, path)

    def settings(self) -> dict[str, Any]:
        """The :data:`SETTINGS` as plain values (the trigger as its ``repr``), so a checkpoint holding them still
        loads with ``weights_only=True``."""
        values = {name: getattr(self, name) for name in SETTINGS}
        return values | {"classes": list(self.classes), "trigger": repr(self.trigger)}

    def state_dict(self) -> dict[str, Any]:
        """The split indices and :meth:`settings`, stored in every checkpoint: a run's poisoned and unseen images
        are recoverable, and a checkpoint loaded with other settings is refused."""
        return self.plan.as_dict() | {"settings": self.settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise a one-line ``ValueError`` naming the first setting, else the first split, that differs from this
        data module's (the checkpoint's numbers would mean something else)."""
        difference = differing_setting(state_dict.get("settings"), self.settings())
        if difference is not None:
            name, saved, current = difference
            raise ValueError(f"the checkpoint was trained with data {name}={str(saved)[:100]} but this data module "
                             f"has {str(current)[:100]}; use the run's settings")
        for name, indices in self.plan.as_dict().items():
            saved = state_dict.get(name)
            if isinstance(saved, Tensor) and not torch.equal(saved, indices):
                raise ValueError(f"the checkpoint's {name} split indices differ from this data module's (another "
                                 f"seed, or changed {self.source} data); use the run's settings")

    def train_dataloader(self) -> DataLoader:
        """Training batches; the first call writes the run's ``splits.json`` and ``environment.json`` (rank 0; with
        the precision the trainer runs in, which on a CPU without native bfloat16 is not the config's). The
        fit loop asks for them after every setup hook passed, so a run refused at setup writes nothing."""
        train = self._datasets["train"]
        if self.trainer is not None and self.trainer.is_global_zero:  # a test run never asks: it writes nothing
            root = Path(self.trainer.default_root_dir)
            self.save_splits(root / "splits.json")
            atomic_json(environment() | {"trainer_precision": str(self.trainer.precision)}, root / "environment.json")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = GlobalBatchSampler(train, self.batch_size, num_replicas=world, rank=rank)
        return DataLoader(train, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, name: str) -> DataLoader:
        """Split ``name``'s batches ``(images, labels, triggered images, attack labels)`` (uint8 images), in order,
        ``eval_batch_size`` at a time on ``num_workers`` workers; it sets the data module up first, so it also serves
        without a Trainer (the defense's evaluation). Streamed splits are decoded batch by batch, nothing kept."""
        self.setup()
        return DataLoader(self._datasets[name], batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch: list[Tensor], dataloader_idx: int) -> list[Tensor]:
        """uint8 -> float on the device, then augment training batches there."""
        batch = [to_float(item) if item.dtype == torch.uint8 else item for item in batch]
        if self.trainer is not None and self.trainer.training and self.augment != "none":
            shard = (self.trainer.global_rank, self.trainer.world_size)  # draws as one process with the global batch
            images = random_crop(batch[0], self.crop_padding, shard)
            batch[0] = random_flip(images, shard) if self.augment == "crop_flip" else images
        return batch
