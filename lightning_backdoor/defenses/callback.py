"""DefenseCallback: runs a defense at the end of fit (or when called) inside any Lightning Trainer."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_backdoor.defenses.activation_editing import ActivationEditing
from lightning_backdoor.defenses.adapt import as_pixels, defendable, existing_transform, same_transform
from lightning_backdoor.defenses.base import BackdoorKnowledge, Defense, UnseenData, defense_name
from lightning_backdoor.defenses.estimate_first import EstimateFirst, without_knowledge
from lightning_backdoor.defenses.outputs import write_outputs
from lightning_backdoor.defenses.report import (DefenseReport, TestData, chance_line, estimation_line,
                                                greyscale_line, near_chance, run_defense, selection_line)
from lightning_backdoor.evaluation import evaluate
from lightning_backdoor.io import first_line, state_digest
from lightning_backdoor.models.input_transform import InputTransform
from lightning_backdoor.triggers import Trigger

#: Unseen images the model runs on at setup to check what it returns.
PROBE_IMAGES = 2


def _collect(loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Images and labels of a loader yielding ``(images, labels, ...)`` batches."""
    images, labels = zip(*((batch[0], batch[1]) for batch in loader))
    return torch.cat(images), torch.cat(labels)


def _yields_triggered_tests(datamodule: Any) -> bool:
    """Whether ``datamodule``'s ``test_dataloader()`` yields pixel batches ``(images, labels, triggered images,
    attack labels)`` and works without a Trainer, as a ``PoisonedDataModule``'s does (it has ``test_dataset()``)."""
    return hasattr(datamodule, "test_dataset")


class CleanHalf:
    """The clean ``(images, labels)`` of a loader's ``(images, labels, triggered images, attack labels)`` batches;
    re-iterable as the loader is."""

    def __init__(self, loader: Iterable[list[Tensor]]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, *_ in self.loader:
            yield images, labels


def defense_device(trainer: L.Trainer) -> torch.device:
    """Where the defense runs under ``trainer``: its root device where that is a CUDA GPU or the CPU; the CPU on
    any other accelerator (MPS computes no float64, which the edit's key-space solve uses)."""
    device = trainer.strategy.root_device
    return device if device.type in ("cuda", "cpu") else torch.device("cpu")


def defended_network(pl_module: nn.Module) -> nn.Module:
    """The module the defense edits and addresses layers in: a PoisonedClassifier's ``net`` (layer names such as
    ``blocks.2.conv1``), else the LightningModule itself (``model.fc`` for a module holding ``self.model``)."""
    return pl_module.net if isinstance(getattr(pl_module, "net", None), nn.Module) else pl_module


def check_ranks_agree(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """Compare the weights' SHA-256 across ranks (an all-gather of 32 bytes); raise if any rank differs, print the
    digest once, and return it. It equals ``state_digest`` of the saved ``defended.safetensors``."""
    digest = state_digest(pl_module.state_dict())
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int32, device=pl_module.device)
    gathered = trainer.strategy.all_gather(mine).reshape(-1, mine.numel())
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError("defense: the ranks hold different weights after the broadcast of the defended model")
    holders = "the defended weights" if len(gathered) == 1 else f"all {len(gathered)} processes' defended weights"
    rank_zero_info(f"defense: {holders}: sha256 {digest}")
    return digest


class DefenseCallback(L.Callback):
    """Remove a backdoor when training ends: defend, evaluate before/after on the test split, log, and save.

    Trigger, target class and unseen data come from a ``PoisonedDataModule`` when the trainer has one; pass them
    here to defend a model trained any other way. Whatever can be checked before training is checked in
    :meth:`setup` (one-line ``ValueError``, before the first training step): where the unseen images come from and
    that there are enough, that the model's output holds logits for every class (a tensor (N, K), a tuple or list
    with the logits first, or a dict with ``"logits"``), and that ``normalize`` agrees with the model's own.

    Images are pixels, floats in [0, 1] ``(N, C, H, W)`` (uint8 0-255 is divided by 255): the unseen and test
    images, and what triggers act on. A model trained on normalised images reads pixels during the defense through
    ``normalize`` (attached as its input transform, removed afterwards); images from the given loaders that are not
    pixels are un-normalised with it (one line says so). The defense and its evaluation compute in float32 whatever
    the trainer's precision; the weights are stored back in the model's dtype (and evaluated after that rounding).

    Afterwards the trainer's checkpoint logic returns the defended weights: every ``ModelCheckpoint``'s
    ``best_model_path`` names the written ``defended.ckpt``, so ``trainer.test(datamodule=dm)`` (``ckpt_path="best"``)
    tests the defended model; ``ckpt_path="last"`` and the files in the checkpoint folder stay the undefended ones.
    A later process has no such state (``lightning-backdoor test --ckpt_path best`` is refused by Lightning): pass
    ``--ckpt_path <run>/defended.ckpt``. A ``fast_dev_run`` smoke run, or a fit that ran no training step, skips
    the defense and writes nothing.

    Once the files are written, every callback of the Trainer with an ``on_defense_end(trainer, pl_module, report)``
    method gets the :class:`DefenseReport` (on rank 0): e.g. ``WandbDefenseReport`` logs it to W&B.

    Args:
        defense: the defense to run (default: activation-guided editing with repair).
        trigger: the backdoor trigger, acting on pixels (default: the data module's).
        target_class: the attack's target class (default: the data module's).
        unseen_per_class: use the first k unseen images per class (default: all the data module holds); a
            negative k is refused (``ValueError``, one line) when the callback is built.
        unseen_dataloader: clean data the model never saw, yielding ``(images, labels)`` (pixels; see
            ``normalize``).
        test_dataloader: clean test data for the before/after evaluation (default: the data module's test split).
        output_dir: where ``defense_report.json`` and the defended weights go (default: the trainer's root dir).
        on_fit_end: run automatically at the end of ``fit``.
        trigger_known: ``False`` defends without backdoor knowledge: a defense that needs it is composed with a
            trigger estimator (``EstimateFirst``); the known trigger and target (if any) only serve the before/after
            evaluation. Without them the report holds
            the estimated trigger's success before and after (``estimated_asr``), the true ASR unmeasured.
        test_trigger: ``False``: no trigger is known to act on the test images, whatever the data module's (a
            ``PoisonedDataModule`` built without one holds its default BadNets patch; ``defend`` passes ``False`` when
            the data config names none): they are evaluated clean, the true ASR unmeasured. Needs
            ``trigger_known=False``.
        normalize: ``{"mean": [...], "std": [...]}`` in pixel units ([0, 1]), one value or one per channel: the
            normalisation the model was trained with, for a LightningModule whose data loaders normalise. ``None``:
            the model reads pixels (or carries its own input transform, as ``PoisonedClassifier(normalize=...)``).
        input_size: side in pixels of the square images the model was trained on (resized to it during the
            defense); with ``normalize``.
        accept_low_accuracy: defend even when the model is near chance on the unseen images (otherwise refused:
            wrong preprocessing or class order is likelier than a backdoor).
        class_names: the labels' names in label order, shown in the report's warnings (default: the data module's
            ``classes``, when it has as many as the model has logits).
    """

    def __init__(self, defense: Defense | None = None, trigger: Trigger | None = None,
                 target_class: int | None = None, unseen_per_class: int | None = None,
                 unseen_dataloader: DataLoader | None = None, test_dataloader: DataLoader | None = None,
                 output_dir: str | None = None, on_fit_end: bool = True, trigger_known: bool = True,
                 normalize: dict[str, list[float]] | None = None, input_size: int | None = None,
                 accept_low_accuracy: bool = False, test_trigger: bool = True,
                 class_names: Sequence[str] | None = None) -> None:
        if unseen_per_class is not None and (isinstance(unseen_per_class, bool) or not isinstance(unseen_per_class, int)
                                             or unseen_per_class < 0):
            raise ValueError(f"unseen_per_class={unseen_per_class!r} is negative or not an integer: give a count "
                             f"of images per class, or null for all the unseen images")
        self.defense = defense if defense is not None else ActivationEditing()
        self.trigger, self.target_class, self.unseen_per_class = trigger, target_class, unseen_per_class
        self.unseen_dataloader, self.test_dataloader = unseen_dataloader, test_dataloader
        self.output_dir, self.run_on_fit_end, self.trigger_known = output_dir, on_fit_end, trigger_known
        self.accept_low_accuracy, self.test_trigger = accept_low_accuracy, test_trigger
        self.class_names = tuple(class_names) if class_names is not None else None
        if not test_trigger and trigger_known:
            raise ValueError("test_trigger=False (no trigger known to act on the test images) needs trigger_known=false: "
                             "the defense cannot use a trigger it does not have")
        self.transform = self._build_transform(normalize, input_size)
        self.report: DefenseReport | None = None
        self.report_path: Path | None = None
        self.checkpoint_path: Path | None = None

    @staticmethod
    def _build_transform(normalize: dict[str, list[float]] | None, input_size: int | None) -> InputTransform | None:
        if normalize is None and input_size is None:
            return None
        normalize = dict(normalize) if normalize is not None else {"mean": [0.0], "std": [1.0]}
        if set(normalize) != {"mean", "std"}:
            raise ValueError(f"normalize takes the keys mean and std, got {sorted(map(str, normalize))}")
        return InputTransform(normalize["mean"], normalize["std"], size=input_size)

    # --- when ------------------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse, before the first training step, a defense that could not run at the end of fit."""
        datamodule = getattr(trainer, "datamodule", None)
        self._check_target(datamodule)
        if stage == "fit" and self.run_on_fit_end:
            self.check(pl_module, datamodule)

    def check_before_fit(self, pl_module: L.LightningModule, datamodule: Any) -> None:
        """What :meth:`setup` checks for a fit, callable before the Trainer starts: Lightning creates its loggers'
        runs (a W&B run) before any callback's ``setup``, so a command line that checks here first refuses with
        nothing written, W&B included. Nothing for a callback that does not run at the end of fit.

        Raises:
            ValueError: (one line) what :meth:`setup` refuses.
        """
        self._check_target(datamodule)
        if self.run_on_fit_end:
            self.check(pl_module, datamodule)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.run_on_fit_end:
            return
        if trainer.fast_dev_run:
            rank_zero_info("defense: skipped on a fast_dev_run smoke run (no defended weights or report written)")
            return
        if trainer.global_step == 0:
            rank_zero_info("defense: skipped, the fit ran no training step (no defended weights or report written)")
            return
        self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> DefenseReport:
        """Defend ``pl_module`` in place on rank 0, on the Trainer's device (:func:`defense_device`: the GPU it
        trained on, though Lightning has moved the module back to the CPU before ``on_fit_end``; it is moved back
        after), broadcast the weights to every rank, log and save; point every
        ``ModelCheckpoint``'s ``best_model_path`` at the defended checkpoint. An error on rank 0 is raised on every
        rank (a ``ValueError`` as a ``ValueError``), so no rank waits for a broadcast that never comes."""
        outcome: tuple[DefenseReport | None, str | None, tuple[bool, str] | None] = (None, None, None)
        failure: Exception | None = None
        if trainer.is_global_zero:
            # defended on the Trainer's device (where it trained: Lightning's teardown has moved it to the CPU before
            # on_fit_end), then put back where it was
            device = next(pl_module.parameters()).device
            try:
                pl_module.to(defense_device(trainer))
                report = self.defend(pl_module, getattr(trainer, "datamodule", None), trainer.loggers,
                                     Path(self.output_dir or trainer.default_root_dir))
                for callback in trainer.callbacks:
                    hook = getattr(callback, "on_defense_end", None)
                    if callable(hook):
                        hook(trainer, pl_module, report)
                outcome = (report, str(self.checkpoint_path), None)
            except Exception as error:  # re-raised below, after the other ranks learn of it
                failure = error
                outcome = (None, None, (isinstance(error, ValueError), first_line(error)))
            finally:
                pl_module.to(device)
        report, checkpoint, failed = trainer.strategy.broadcast(outcome, src=0)
        if failure is not None:
            raise failure
        if failed is not None:
            raise (ValueError if failed[0] else RuntimeError)(f"the defense failed on rank 0: {failed[1]}")
        state = trainer.strategy.broadcast({k: v.cpu() for k, v in pl_module.state_dict().items()}, src=0)
        pl_module.load_state_dict(state)
        check_ranks_agree(trainer, pl_module)
        self.report, self.checkpoint_path = report, Path(checkpoint)
        self._point_checkpoints_at_defended(trainer, checkpoint)
        return report

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Loading a fit checkpoint (``trainer.test(ckpt_path="last")``) restores its ``ModelCheckpoint`` state, the
        poisoned ``best_model_path``: point it at the defended weights again."""
        if stage != "fit" and self.checkpoint_path is not None:
            self._point_checkpoints_at_defended(trainer, str(self.checkpoint_path), announce=False)

    @staticmethod
    def _point_checkpoints_at_defended(trainer: L.Trainer, checkpoint: str, announce: bool = True) -> None:
        """``trainer.test()``/``validate()``/``predict()`` without a model load ``ckpt_path="best"``: make that the
        defended weights, never the poisoned checkpoint of the fit."""
        callbacks = [callback for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)]
        for callback in callbacks:
            callback.best_model_path = checkpoint
        if callbacks and announce:
            folders = ", ".join(sorted({str(callback.dirpath) for callback in callbacks}))
            rank_zero_info(f"defense: trainer.test()/validate() (ckpt_path='best') now load the defended weights "
                           f"{checkpoint}; ckpt_path='last' and the checkpoints in {folders} are undefended")

    # --- what ------------------------------------------------------------------------------------------------------

    def check(self, pl_module: nn.Module, datamodule: Any) -> int | None:
        """Everything checkable before training, without changing the model: unseen and test data sources, the
        unseen split's size, ``normalize`` against the model's own transform, and the model's output on
        ``PROBE_IMAGES`` unseen images (in eval mode, float32, no gradients). Returns the number of classes K
        (``None`` for a module without parameters yet, built in ``configure_model``: probed when defending).

        Raises:
            ValueError: (one line) any of these would fail the defense after training.
        """
        network = defended_network(pl_module)
        unseen = self._unseen(datamodule, self._effective_transform(network), announce=False)
        self._check_test_source(datamodule)
        parameter = next(pl_module.parameters(), None)
        if parameter is None:
            return None
        with defendable(network, self._transform_to_attach(network, unseen.images.shape[1])):
            return self._probe(network, unseen, datamodule, parameter.device)

    def defend(self, pl_module: nn.Module, datamodule: Any, loggers: list[Any], output_dir: Path,
               weights_source: str | None = None) -> DefenseReport:
        """Defend ``pl_module`` in place (no Trainer needed), log its scalars to ``loggers``, write the report and
        weights (``report.files``). The report's ``weights`` name ``weights_source`` (the file the weights were
        read from, if any) and the SHA-256 of the module's state before and after (:func:`state_digest`; the
        second equals that of the written ``defended.safetensors``).

        Raises:
            ValueError: (one line) what :meth:`check` refuses, test images that are not pixels, or a model near
                chance on the unseen images (unless ``accept_low_accuracy``).
        """
        self._check_target(datamodule)
        digest_before = state_digest(pl_module.state_dict())
        trigger = (None if not self.test_trigger else self.trigger if self.trigger is not None
                   else getattr(datamodule, "trigger", None))
        target = self.target_class if self.target_class is not None else getattr(datamodule, "target_class", None)
        network = defended_network(pl_module)
        effective = self._effective_transform(network)
        unseen = self._unseen(datamodule, effective)
        self._check_test_source(datamodule)
        device = next(pl_module.parameters()).device
        # a known trigger without its target (or the reverse) cannot be defended with; neither: estimated instead
        trigger_known = self.trigger_known and trigger is not None
        with defendable(network, self._transform_to_attach(network, unseen.images.shape[1])) as round_to_stored:
            num_classes = self._probe(network, unseen, datamodule, device)
            test = self._test(datamodule, trigger, target, num_classes, effective)
            names = self.class_names if self.class_names is not None else getattr(datamodule, "classes", None)
            if names is not None and len(names) == num_classes:
                test = dataclasses.replace(test, classes=tuple(names))
            unseen = UnseenData(unseen.images.to(device), unseen.labels.to(device))
            warnings = self._check_accuracy(network, unseen, num_classes)
            warnings += [line for line in (greyscale_line(unseen.images),) if line is not None]
            defense = self.defense if trigger_known else without_knowledge(self.defense)
            name = defense_name(defense.defense if isinstance(defense, EstimateFirst) else defense)
            if isinstance(defense, EstimateFirst):
                name = f"estimating the trigger, then {name}"
            rank_zero_info(f"defense: {name} on {len(unseen.labels)} unseen images, evaluated on {test.num_images} "
                           f"test images before and after...")
            knowledge = BackdoorKnowledge.of(trigger, target) if trigger_known else None
            started = time.perf_counter()
            report = run_defense(network, defense, unseen, knowledge, test, after_defense=round_to_stored)
            evaluation = time.perf_counter() - started - report.result.seconds  # the test passes around the defense
        report.warnings[:0] = warnings
        for logger in loggers:
            logger.log_metrics({f"defense/{stage}/{name}": value for stage, metrics in report.stages.items()
                                for name, value in metrics.items() if isinstance(value, float)})
            if report.der is not None:
                logger.log_metrics({"defense/der": report.der, "defense/seconds": report.result.seconds})
        report.weights = {"source": weights_source, "sha256_before": digest_before,
                          "sha256_after": state_digest(pl_module.state_dict())}
        self.report_path = write_outputs(report, pl_module.state_dict(), output_dir)
        self.checkpoint_path = report.files["checkpoint"]
        self.report = report
        verdict = estimation_line(report.result.details)
        if verdict is not None:
            rank_zero_info(f"defense: {verdict}")
        edited = "" if report.result.layer is None else (
            f"; edited {report.result.layer}{' and repaired' if report.result.repaired else ''}")
        seconds, details = f"{report.result.seconds:.2f} s", report.result.details
        if "estimation_seconds" in details:  # the estimate's and the defense's own, which the total sums
            seconds += (f" (trigger estimation {details['estimation_seconds']:.2f} s, then "
                        f"{details.get('editing_seconds', 0.0):.2f} s)")
        rank_zero_info(f"defense: {report.summary_line()}{edited} in {seconds} (the test split's evaluation before and "
                       f"after: {evaluation:.0f} s); report: {self.report_path}")
        chosen = selection_line(report.result.layer, report.result.details)
        if chosen is not None:
            rank_zero_info(f"defense: {chosen}")
        prior = report.result.details.get("batchnorm_prior")
        if prior is not None:
            rank_zero_info(f"defense: BatchNorm prior weight {prior['weight']:g} at {report.result.layer} "
                           f"({'chosen on the unseen split' if prior['chosen_on_unseen'] else 'as set'})")
        for name, reason in report.result.details.get("skipped_layers", {}).items():
            rank_zero_info(f"defense: layer {name} not tried: {reason}")
        for line in report.warnings:  # a plain line, as the others (a Python warning would prefix this file's path)
            rank_zero_info(f"defense: warning: {line}")
        return report

    # --- checks ----------------------------------------------------------------------------------------------------

    def _check_target(self, datamodule: Any) -> None:
        """A known trigger needs its one target class; an all-to-all data module has none (``target_class`` None).
        A trigger given without any target class (or the reverse) is refused too."""
        if self.trigger_known and self.target_class is None and getattr(datamodule, "all_to_all", False):
            raise ValueError("the defense with trigger_known=true removes an all-to-one backdoor (one target class); "
                             "the data is all_to_all=true: set trigger_known=false, or defend without this callback")
        trigger = self.trigger if self.trigger is not None else getattr(datamodule, "trigger", None)
        target = self.target_class if self.target_class is not None else getattr(datamodule, "target_class", None)
        if self.trigger_known and (trigger is None) != (target is None):
            given, missing = ("trigger", "target_class") if target is None else ("target_class", "trigger")
            raise ValueError(f"the defense got a {given} but no {missing}: pass {missing}=, or trigger_known=false "
                             f"to estimate both")

    def _effective_transform(self, network: nn.Module) -> InputTransform | None:
        """The normalisation the model reads pixels through: its own input transform, else ``normalize``.

        Raises:
            ValueError: both exist and differ.
        """
        own = existing_transform(network)
        if own is not None and self.transform is not None and not same_transform(own, self.transform):
            raise ValueError(f"normalize/input_size {self.transform.as_dict()} differ from the model's own input "
                             f"transform {own.as_dict()}: drop them from the callback (the model normalises itself)")
        return own if own is not None else self.transform

    def _transform_to_attach(self, network: nn.Module, channels: int) -> InputTransform | None:
        """``normalize`` for the duration of the defense, unless the model has its own (then nothing), checked
        against the images' ``channels``."""
        if self.transform is None or existing_transform(network) is not None:
            return None
        return InputTransform(self.transform.mean, self.transform.std, self.transform.size, channels=channels)

    def _probe(self, network: nn.Module, unseen: UnseenData, datamodule: Any, device: torch.device) -> int:
        """Run the (adapted) model on ``PROBE_IMAGES`` unseen images; return K, its logits per image. Also the
        defense's own :meth:`~lightning_backdoor.defenses.base.Defense.check_model` on them.

        Raises:
            ValueError: it fails, returns no logits, K is not the data's number of classes, or the defense refuses
                the model.
        """
        images = unseen.images[:PROBE_IMAGES].to(device)
        was_training = network.training
        network.eval()  # batch norm keeps its statistics
        try:
            with torch.no_grad():
                logits = network(images)
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(f"the model fails on {len(images)} unseen images of shape {tuple(images.shape[1:])}: "
                             f"{first_line(error)}") from None
        finally:
            network.train(was_training)
        if logits.ndim != 2 or len(logits) != len(images):
            raise ValueError(f"the model returns logits of shape {tuple(logits.shape)} for {len(images)} images; the "
                             f"defense reads (N, K), one logit per class")
        classes = logits.shape[1]
        expected = getattr(datamodule, "num_classes", None)
        if expected is not None and classes != expected:
            raise ValueError(f"the model returns {classes} logits per image but the data has {expected} classes")
        if classes <= int(unseen.labels.max()):
            raise ValueError(f"the model returns {classes} logits per image but the unseen labels reach "
                             f"{int(unseen.labels.max())}")
        self.defense.check_model(network, images)  # e.g. the edit's layer: before training, not after it
        return classes

    def _check_accuracy(self, network: nn.Module, unseen: UnseenData, num_classes: int) -> list[str]:
        """Refuse a model near chance on the unseen images (see :func:`near_chance`) unless
        ``accept_low_accuracy``; then return the warning line for the report."""
        accuracy = evaluate(network, unseen.images, unseen.labels, None, None, num_classes, None)["clean_acc"]
        total = len(unseen.labels)
        if not near_chance(round(accuracy * total), total, num_classes):
            return []
        line = f"the model is {chance_line(accuracy, total, num_classes, 'unseen')}: wrong preprocessing " \
               f"(normalize?), class order or architecture (e.g. a stem stride)?"
        if not self.accept_low_accuracy:
            raise ValueError(f"{line} to defend anyway pass accept_low_accuracy=True (defend: --accept_low_accuracy true)")
        return [f"{line} defended anyway (accept_low_accuracy)"]

    def _check_test_source(self, datamodule: Any) -> None:
        if self.test_dataloader is None and not _yields_triggered_tests(datamodule) and not is_overridden(
                "test_dataloader", datamodule, L.LightningDataModule):
            raise ValueError("DefenseCallback needs clean test data for the before/after evaluation: use a data "
                             "module with a test split or pass test_dataloader=")

    # --- data ------------------------------------------------------------------------------------------------------

    def _unseen(self, datamodule: Any, transform: InputTransform | None, announce: bool = True) -> UnseenData:
        """The unseen images as pixels (N, C, H, W) in [0, 1] with their labels; ``announce``: say so in one line
        when they had to be un-normalised."""
        if self.unseen_dataloader is not None:
            images, labels = _collect(self.unseen_dataloader)
            pixels, undone = as_pixels(images, transform, "unseen")
            if undone and announce:
                rank_zero_info(f"defense: the unseen images are normalised; undoing normalize {transform.as_dict()}")
            return UnseenData(pixels, labels)
        if datamodule is None or not hasattr(datamodule, "unseen_set"):
            raise ValueError("DefenseCallback needs unseen clean data: use a PoisonedDataModule or pass "
                             "unseen_dataloader=")
        unseen = datamodule.unseen_set(self.unseen_per_class)
        return UnseenData(unseen.images.float() / 255, unseen.labels)

    def _test(self, datamodule: Any, trigger: Trigger | None, target: int | None, num_classes: int,
              transform: InputTransform | None) -> TestData:
        """The test data of the before/after evaluation. A ``PoisonedDataModule``'s test loader is read batch by
        batch (decoded per batch when it streams: memory held does not grow with the test split); the images of
        ``test_dataloader=`` or of another data module's loader are collected, un-normalised if need be, and
        triggered with the known ``trigger``."""
        if self.test_dataloader is None and _yields_triggered_tests(datamodule):
            loader = datamodule.test_dataloader()
            if trigger is None:  # the data module's triggered half is none of this model's business
                return TestData(CleanHalf(loader), len(loader.dataset), num_classes, target)  # type: ignore[arg-type]
            return TestData.from_loader(loader, num_classes, target, getattr(datamodule, "trigger", None))
        loader = self.test_dataloader if self.test_dataloader is not None else datamodule.test_dataloader()
        images, labels = _collect(loader)
        pixels, undone = as_pixels(images, transform, "test")
        if undone:
            rank_zero_info(f"defense: the test images are normalised; undoing normalize {transform.as_dict()}")
        return TestData.from_clean(pixels, labels, trigger, target, num_classes)
