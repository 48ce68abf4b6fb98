"""PoisonedClassifier: the LightningModule that trains a classifier on (possibly poisoned) data and reports
clean accuracy, attack success rate, ASR floor, robust accuracy and target-class accuracy."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.metrics import BackdoorMetrics
from lightning_backdoor.models import build_model
from lightning_backdoor.models.input_transform import InputTransform


def nesterov_sgd(params: Any) -> torch.optim.Optimizer:
    """The default optimiser: SGD, lr 0.1, Nesterov momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


class PoisonedClassifier(L.LightningModule):
    """An image classifier from the model registry, trained with cross-entropy.

    Every image it gets (``forward``, the batches) is in pixel space: floats in [0, 1], ``(N, C, H, W)``. What the
    network was trained on (normalised, resized) is part of the model spec: ``normalize`` and ``input_size`` attach an
    :class:`InputTransform` to ``self.net`` as a forward pre-hook, so every caller of the bare network (the defense,
    trigger inversion, baselines) feeds it pixels and it sees what it was trained on. ``self.net.state_dict()``
    keeps the network's keys only.

    Args:
        model: a registered model name (``compact``, ``preact_resnet18``, ``resnet18``, ``vgg16_bn``),
            ``torchvision:<name>``, ``timm:<name>`` or the class path of any ``nn.Module`` (``package.module.Class``).
        num_classes: number of classes (linked from the data module by the CLI).
        in_channels: image channels (linked from the data module by the CLI).
        model_kwargs: extra constructor arguments of the model, e.g. ``{"width": 0.5}``.
        normalize: ``{"mean": [...], "std": [...]}`` in pixel units ([0, 1]; e.g. CIFAR-10's mean
            ``[0.4914, 0.4822, 0.4465]``), one value or one per channel: the network gets ``(x - mean) / std``.
            ``None``: the network reads [0, 1] pixels as they are.
        input_size: side in pixels of the square images the network was trained on; other sizes are resized
            (bilinear, antialiased) before normalising. ``None``: never resize.
        target_class: the attack's target, for target-class accuracy (linked from the data module's attribute:
            ``None`` under all-to-all, which has no target class, and then no target-class accuracy is logged).
        optimizer: the optimiser factory; its learning rate is the schedule's peak.
        schedule: per-step learning-rate schedule: linear warm-up then linear decay to zero (``onecycle``),
            warm-up then cosine (``cosine``), or ``constant``.
        warmup_fraction: fraction of all steps spent warming up.
        label_smoothing: cross-entropy label smoothing.

    Raises:
        ValueError: (one line, at construction) ``normalize`` has keys other than ``mean`` and ``std``, or values
            that :class:`InputTransform` refuses (lengths, non-finite, std <= 0, mean outside [0, 1]).
    """

    def __init__(
        self,
        model: str = "compact",
        num_classes: int = 10,
        in_channels: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        target_class: int | None = None,
        optimizer: OptimizerCallable = nesterov_sgd,
        schedule: Literal["onecycle", "cosine", "constant"] = "onecycle",
        warmup_fraction: float = 0.2,
        label_smoothing: float = 0.0,
        normalize: dict[str, list[float]] | None = None,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        transform = model_input_transform(normalize, input_size, in_channels)  # checked before building the model
        self.net = build_model(model, num_classes=num_classes, in_channels=in_channels, **(model_kwargs or {}))
        self.net.to(memory_format=torch.channels_last)  # with bf16 autocast, ~2x as fast on a CPU with native bf16
        if transform is not None:
            transform.attach(self.net)
        self.optimizer_factory = optimizer
        self.val_metrics = BackdoorMetrics(num_classes, target_class)
        self.test_metrics = BackdoorMetrics(num_classes, target_class)
        self._training_rng: Tensor | None = torch.get_rng_state()

    def setup(self, stage: str) -> None:
        """Training continues torch's random stream from where initialisation left it. Lightning's DDP re-seeds
        every rank at launch; restoring the state makes a DDP run draw the same shuffles and crops as one process
        (with one process it changes nothing: no draws happen in between)."""
        if stage == "fit" and self._training_rng is not None:
            torch.set_rng_state(self._training_rng)
            self._training_rng = None

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def _evaluate(self, batch: list[Tensor], metrics: BackdoorMetrics) -> None:
        """Batches are ``(images, labels)`` or ``(images, labels, triggered_images, attack_labels)``."""
        logits = self(batch[0])
        triggered = self(batch[2]) if len(batch) == 4 else None
        metrics.update(logits, batch[1], triggered, batch[3] if len(batch) == 4 else None)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: BackdoorMetrics) -> None:
        values = metrics.compute()
        per_class = values.pop("per_class_acc")
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=stage == "val")
        if stage == "test":
            self.log_dict({f"{stage}/class_acc/{index}": value for index, value in enumerate(per_class)})
        metrics.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameters())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, round(self.hparams.warmup_fraction * total))

        def factor(step: int) -> float:
            if self.hparams.schedule == "constant":
                return 1.0
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if self.hparams.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0 - progress

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def model_input_transform(normalize: dict[str, list[float]] | None, input_size: int | None, in_channels: int
                          ) -> InputTransform | None:
    """The :class:`InputTransform` of ``normalize`` (pixel units) and ``input_size`` (pixels), checked against
    ``in_channels``; ``None`` when both are ``None``. Raises a one-line ``ValueError`` for bad values."""
    if normalize is None and input_size is None:
        return None
    normalize = dict(normalize) if normalize is not None else {"mean": [0.0], "std": [1.0]}
    if set(normalize) != {"mean", "std"}:
        raise ValueError(f"normalize takes the keys mean and std, got {sorted(map(str, normalize))}")
    return InputTransform(normalize["mean"], normalize["std"], size=input_size, channels=in_channels)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside a PoisonedClassifier (or the module itself)."""
    return module.net if isinstance(module, PoisonedClassifier) else module
