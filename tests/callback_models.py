"""Shared pieces of the DefenseCallback tests: a user's own LightningModule on the bundled ``digits`` (8x8, 10
classes), a data module that normalises its batches, a step counter, and a backdoored model trained once."""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor import PoisonedDataModule
from lightning_backdoor.data.augment import random_flip
from lightning_backdoor.metrics import BackdoorMetrics
from lightning_backdoor.triggers import BadNets




#: CIFAR-10-like normalisation for the one grey channel of ``digits`` (pixel units).
MEAN, STD = [0.4733], [0.2516]


class UserClassifier(L.LightningModule):
    """What a user might write: a small CNN whose ``forward`` returns ``output`` (``tensor``, ``tuple``/``list`` with
    the logits first, ``dict`` under ``"logits"``, or something the defense cannot read), trained with SGD at
    ``lr`` (0: the weights never move, to run the callback on a trained model with a one-step fit)."""

    def __init__(self, output: str = "tensor", lr: float = 0.05, num_classes: int = 10, in_channels: int = 1,
                 target_class: int | None = 0) -> None:
        super().__init__()
        self.output, self.lr = output, lr
        self.features = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(32, num_classes + (self.output == "wide"))
        self.test_metrics = BackdoorMetrics(num_classes, target_class)

    def forward(self, images: Tensor) -> Any:
        logits = self.fc(self.features(images))
        extra = images.mean()
        outputs = {"tensor": logits, "tuple": (logits, extra), "list": [logits, extra],
                   "dict": {"logits": logits, "aux": extra}, "wide": logits, "no_logits": {"scores": logits},
                   "string": "logits", "flat": logits.flatten(), "rolled": logits.roll(1, dims=1)}
        return outputs[self.output]

    def logits(self, images: Tensor) -> Tensor:
        output = self(images.to(self.dtype))
        return output[0] if isinstance(output, (tuple, list)) else output["logits"] if isinstance(output,
                                                                                                   dict) else output

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.logits(batch[0]).float(), batch[1])

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.test_metrics.update(self.logits(batch[0]).float(), batch[1], self.logits(batch[2]).float(), batch[3])

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.log_dict({f"test/{name}": values[name] for name in ("clean_acc", "asr")})
        self.test_metrics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9 if self.lr else 0.0)


class NormalisingDigits(PoisonedDataModule):
    """``digits`` whose batches reach the model normalised with ``MEAN``/``STD``, as a torchvision ``Normalize``
    would leave them (the data module's own tensors stay uint8 pixels)."""

    def on_after_batch_transfer(self, batch: list[Tensor], dataloader_idx: int) -> list[Tensor]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        for index in (0, 2)[: len(batch) // 2]:
            batch[index] = normalise(batch[index])
        return batch


def normalise(images: Tensor) -> Tensor:
    """Pixels (N, 1, H, W) in [0, 1] -> ``(x - MEAN) / STD``."""
    return (images - MEAN[0]) / STD[0]


def digits(cls: type[PoisonedDataModule] = PoisonedDataModule, **overrides: Any) -> PoisonedDataModule:
    """``digits`` with a 3x3 BadNets patch toward class 0 on 10 % of the training images, 10 unseen per class."""
    settings = {"source": "digits", "trigger": BadNets(size=3), "poison_rate": 0.1, "unseen_per_class": 10,
                "batch_size": 64} | overrides
    return cls(**settings)


def quiet_trainer(root: Any, callbacks: list[L.Callback], **overrides: Any) -> L.Trainer:
    """A CPU trainer that prints and logs little, writing under ``root``."""
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                "default_root_dir": root, "callbacks": callbacks} | overrides
    return L.Trainer(**settings)


class CountSteps(L.Callback):
    """Counts training batches started: 0 after a refusal at setup."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


@functools.cache
def backdoored_state(normalised: bool = False, flips: bool = False) -> dict[str, Tensor]:
    """The weights of a :class:`UserClassifier` trained 12 epochs on poisoned ``digits`` (pixels, or normalised
    batches), in a plain loop (a Trainer's per-step overhead would dominate); trained once per test process. The
    backdoor takes (ASR 97 % on the 300 test images) and clean accuracy reaches 93 %. No augmentation, or with
    ``flips`` random horizontal flips of the poisoned batches (as CIFAR-10 training does): the model then learns the
    trigger's mirror image too."""
    torch.manual_seed(0)
    model = UserClassifier()
    data = digits(NormalisingDigits if normalised else PoisonedDataModule)
    data.setup("fit")
    optimizer = model.configure_optimizers()
    for _ in range(12):
        for batch in data.train_dataloader():
            images, labels = data.on_after_batch_transfer(list(batch), 0)
            if flips:
                images = random_flip(images)
            loss = F.cross_entropy(model.logits(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def trained(output: str = "tensor", normalised: bool = False, flips: bool = False) -> UserClassifier:
    """A backdoored :class:`UserClassifier` returning ``output``, with ``lr=0`` (a fit leaves its weights alone);
    ``flips``: trained with random horizontal flips."""
    model = UserClassifier(output=output, lr=0.0)
    model.load_state_dict(backdoored_state(normalised, flips), strict=False)
    return model


class DoubledShortcutBlock(nn.Module):
    """A residual block declaring ``relu(bn2(conv2(·)) + shortcut(x))`` whose forward adds twice the shortcut: a
    declaration that does not describe the forward."""

    residual_branch, residual_norm, residual_shortcut = "conv2", "bn2", "shortcut"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + 2 * self.shortcut(x))


class WronglyDeclaredResidualNet(nn.Module):
    """A stem conv, one :class:`DoubledShortcutBlock` and a pooled head: the edit's setup check refuses its block."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(in_channels, 8, 3, padding=1), DoubledShortcutBlock(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.block(F.relu(self.stem(images))).mean((2, 3)))
