"""The trigger interface and its registry: a trigger is a pure-torch function on image batches in [0, 1]."""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from pathlib import Path
from typing import ClassVar, ContextManager

import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor, nn

from lightning_backdoor.io import atomic_save, load_tensors
from lightning_backdoor.registry import Registry

#: Trigger classes by name; a trigger registers with ``@TRIGGERS.register("<name>")`` above its class.
TRIGGERS: Registry[type[Trigger]] = Registry("trigger")

#: What a :class:`PreparedTrigger` says when it starts, ends or loads a preparation (INFO, rank 0 only). Shown on
#: stderr as Lightning shows its own lines (a handler of its own unless the root logger has one); silence it with
#: ``logging.getLogger("lightning_backdoor.triggers").setLevel(logging.WARNING)``. Not Lightning's logger: the
#: command line holds that one back while a run is set up, and a preparation (minutes on a large data set) happens
#: then.
log = logging.getLogger("lightning_backdoor.triggers")
log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    log.addHandler(logging.StreamHandler())
    log.propagate = False


def say(line: str) -> None:
    """Log ``line`` at INFO on the global rank 0 only (the rank Lightning records; 0 outside a distributed run)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        log.info(line)


class Trigger(ABC):
    """Base class of every trigger.

    Subclasses implement :meth:`apply` on a float batch ``(N, C, H, W)`` in [0, 1] and return a batch of the same
    shape, dtype and range. A trigger is deterministic: its random parts (patterns, warping fields) are drawn once
    from ``seed`` for a given image shape and cached. A subclass registered with ``@TRIGGERS.register("<name>")``
    gets that name as its ``name``.
    """

    #: The name it is registered (and built) by; empty for triggers that are not chosen by name (estimated ones).
    name: ClassVar[str] = ""
    #: Extra training samples per poisoned one that get the trigger's *noise mode* with their labels kept (WaNet;
    #: Adaptive-Blend's regularisation samples).
    cross_ratio: float = 0.0
    #: A clean-label attack: the data module refuses it without ``clean_label: true`` (Label-Consistent).
    clean_label_only: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abstractmethod
    def apply(self, images: Tensor) -> Tensor:
        """Return ``images`` (N, C, H, W) in [0, 1] with the trigger applied."""

    def __call__(self, images: Tensor) -> Tensor:
        return self.apply(images)

    def mask(self, image_shape: tuple[int, int, int]) -> Tensor | None:
        """Where the trigger acts, ``(1, H, W)`` in [0, 1]; ``None`` for a global trigger (it touches every pixel)."""
        return None

    def attached(self, model: nn.Module) -> ContextManager[None]:
        """Inside, ``model`` sees the trigger where it acts in the network: a feature-space trigger (estimated at a
        layer) hooks that layer's input; an image-space trigger acts in :meth:`apply` and needs nothing here."""
        return nullcontext()

    def check(self, image_shape: tuple[int, int, int]) -> None:
        """Raise ``ValueError`` with a one-line message if the trigger cannot apply to images of ``(C, H, W)``."""

    def apply_for_training(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The trigger as the poisoned *training* samples carry it; :meth:`apply` is the trigger at test time (the
        test split, evaluation, defenses). The default is :meth:`apply`: one trigger for both. Adaptive-Blend
        overrides it (a random part of its pattern, at a lower opacity). ``generator`` is a CPU generator, seeded by
        the data module, so the random parts repeat for a seed on any device."""
        return self.apply(images)

    def apply_noise(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The noise mode: a randomised variant trained with true labels so the trigger stays specific (WaNet), or
        the trigger on samples that keep their labels (Adaptive-Blend's regularisation samples)."""
        return images

    def prepare(self, images: Tensor, labels: Tensor, target_class: int | None, num_classes: int,
                cache_dir: str | Path | None = None) -> None:
        """Make what the trigger needs from the attacker's clean training images, once, before any poisoning.

        ``images`` ``(N, C, H, W)`` uint8 and ``labels`` ``(N,)`` int64 are the training split's clean images (never
        the unseen split, never the test split); ``target_class`` is the attack's target (``None`` for all-to-all);
        ``cache_dir`` a folder where the result may be kept for later processes. A no-op here: only triggers made
        with a model (:class:`PreparedTrigger`) need it. :class:`~lightning_backdoor.data.PoisonedDataModule` calls
        it in ``prepare_data`` (rank 0) and ``setup`` (every rank).
        """

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from this trigger's seed."""
        return torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class PreparedTrigger(Trigger):
    """A trigger made with a model: :meth:`prepare` trains a surrogate on the attacker's clean training images and
    computes the pattern (Low Frequency, TrojanNN) or what the per-sample trigger needs (Label-Consistent).

    Subclasses implement :meth:`make`, which returns the prepared tensors by name (``prepared_names``), and read them
    with :meth:`prepared`. :meth:`make` runs on the CPU with the global torch RNG seeded from ``seed`` (and restored
    afterwards, so the run's own draws do not move): two processes with the same settings, data and thread count get
    the same tensors, which is how every DDP rank gets the same pattern. The result is cached in memory (a second
    :meth:`prepare` with the same settings and data does nothing) and, given ``cache_dir``, in
    ``<cache_dir>/<name>-<key>.pt``, a tensors-only file loaded with ``weights_only=True``, where ``key`` hashes the
    trigger's settings (its ``repr``), the images, labels, target class and class count: another process, a resumed
    run or the test command loads it instead of recomputing. Using the trigger before :meth:`prepare` raises a
    one-line ``ValueError``. A preparation says on rank 0 (:data:`log`) what it prepares and where it caches when
    it starts, how long it took when it ends, and that it loaded a cache file when it does.
    """

    #: The tensors :meth:`make` returns; a cache file without them is recomputed.
    prepared_names: ClassVar[tuple[str, ...]] = ()
    #: Part of the cache key: raise it when what :meth:`make` computes changes, so older files are not read.
    cache_version: ClassVar[int] = 1

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._prepared: dict[str, Tensor] | None = None
        self._prepared_key: str | None = None

    @abstractmethod
    def make(self, images: Tensor, labels: Tensor, target_class: int | None, num_classes: int) -> dict[str, Tensor]:
        """The prepared tensors (CPU) from clean float ``images`` ``(N, C, H, W)`` in [0, 1] and ``labels`` ``(N,)``."""

    def preparation_key(self, images: Tensor, labels: Tensor, target_class: int | None, num_classes: int) -> str:
        """A hex digest of everything :meth:`make` depends on: settings, image and label bytes, target, classes."""
        digest = hashlib.sha1()
        header = (self.cache_version, type(self).__qualname__, repr(self), tuple(images.shape), str(images.dtype),
                  target_class, num_classes)
        digest.update(repr(header).encode())
        for tensor in (images, labels):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def prepare(self, images: Tensor, labels: Tensor, target_class: int | None, num_classes: int,
                cache_dir: str | Path | None = None) -> None:
        """Make (or load) the prepared tensors from clean uint8 ``images`` ``(N, C, H, W)`` and ``labels`` ``(N,)``;
        see the class docstring for the caching. Raises ``ValueError`` (one line) for no images, or whatever the
        subclass refuses (e.g. no ``target_class``)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0 or len(labels) != len(images):
            raise ValueError(f"{self.name or type(self).__name__} prepare() needs uint8 images (N, C, H, W) with N > 0 "
                             f"and one label each; got {tuple(images.shape)} {images.dtype} and {len(labels)} labels")
        self.check(tuple(images.shape[1:]))
        key = self.preparation_key(images, labels, target_class, num_classes)
        if key == self._prepared_key:
            return
        name = self.name or type(self).__name__
        path = Path(cache_dir) / f"{name}-{key[:16]}.pt" if cache_dir is not None else None
        tensors = load_tensors(path) if path is not None and path.is_file() else None
        if isinstance(tensors, dict) and all(isinstance(tensors.get(n), Tensor) for n in self.prepared_names):
            say(f"trigger: {name} loaded from its cache {path} (prepared earlier on the same images and settings)")
        else:
            self.check_preparation(images, labels, target_class, num_classes)
            summary = self.preparation_summary(images)
            say(f"trigger: preparing {name} on {len(images):,} clean training images"
                f"{f' ({summary})' if summary else ''}; cache: {path if path is not None else 'none (memory only)'}")
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                tensors = self.make(images.float().div(255), labels, target_class, num_classes)
            if path is not None:
                atomic_save(tensors, path)
            say(f"trigger: prepared {name} in {time.perf_counter() - started:.1f} s"
                f"{f'; cached in {path}' if path is not None else ''}")
        self._prepared, self._prepared_key = tensors, key

    def check_preparation(self, images: Tensor, labels: Tensor, target_class: int | None,
                          num_classes: int) -> None:
        """Raise a one-line ``ValueError`` for a preparation :meth:`make` cannot do (e.g. no target class), before
        any work starts and before the start line is printed; ``images`` ``(N, C, H, W)`` uint8 and ``labels``
        ``(N,)`` are :meth:`prepare`'s. A no-op here."""

    def preparation_summary(self, images: Tensor) -> str:
        """What :meth:`make` will do with ``images`` ``(N, C, H, W)``, in a few words for the start line (e.g. the
        surrogate's training); empty here."""
        return ""

    @property
    def is_prepared(self) -> bool:
        """Whether :meth:`prepare` has run (or loaded) for this trigger."""
        return self._prepared is not None

    def prepared(self, name: str) -> Tensor:
        """The prepared tensor ``name``; raises a one-line ``ValueError`` before :meth:`prepare`."""
        if self._prepared is None:
            raise ValueError(f"the {self.name or type(self).__name__} trigger is made with a model and is not "
                             f"prepared: call trigger.prepare(images, labels, target_class, num_classes) with the "
                             f"attacker's clean training images first (PoisonedDataModule.setup does)")
        return self._prepared[name]


def acts_on_pixels(trigger: Trigger) -> bool:
    """Whether ``trigger`` acts on the images in :meth:`~Trigger.apply`, not through a hook inside the model (a
    feature-space trigger, estimated at a layer, overrides :meth:`~Trigger.attached`)."""
    return type(trigger).attached is Trigger.attached


def build_trigger(name: str, **kwargs: object) -> Trigger:
    """Instantiate a registered trigger by name, e.g. ``build_trigger("badnets", size=3)``.

    Raises:
        ValueError: (one line) an unknown name, with close matches and the known triggers.
    """
    return TRIGGERS.build(name, **kwargs)
