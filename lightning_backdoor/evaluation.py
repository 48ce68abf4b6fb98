"""Evaluate a plain model on clean and triggered data with the project's metrics (no Trainer needed)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_backdoor.metrics import BackdoorMetrics

METRIC_NAMES = ("clean_acc", "asr", "asr_floor", "robust_acc", "target_acc")


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, triggered: Tensor | None, attack_labels: Tensor | None,
             num_classes: int, target_class: int | None, batch_size: int = 1000, bf16: bool = False
             ) -> dict[str, float | list[float]]:
    """CA, ASR, ASR floor, RA, TA (fractions) and per-class accuracy; images float in [0, 1] or uint8.

    ``bf16`` runs the forward passes under bfloat16 autocast with channels-last inputs, about twice as fast on CPU;
    a prediction whose two largest logits are within bf16's rounding can flip (on the CIFAR-10 models 0-0.1 % of
    the test images, docs/results/cifar10.md), so the default stays float32.
    """
    values = _metrics(model, images, labels, triggered, attack_labels, num_classes, target_class, batch_size, bf16)
    out: dict[str, float | list[float]] = {name: values[name].item() for name in METRIC_NAMES if name in values}
    out["per_class_acc"] = values["per_class_acc"].tolist()
    return out


def clean_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """CA (fraction) of ``model`` in eval mode on ``images`` (N, C, H, W) float in [0, 1] or uint8 and ``labels``
    (N,), N >= 1; the classes are as many as the model's logits. The same metric as :func:`evaluate`'s."""
    return _metrics(model, images, labels, None, None, None, None, batch_size)["clean_acc"].item()


@torch.no_grad()
def _metrics(model: nn.Module, images: Tensor, labels: Tensor, triggered: Tensor | None,
             attack_labels: Tensor | None, num_classes: int | None, target_class: int | None,
             batch_size: int, bf16: bool = False) -> dict[str, Tensor]:
    """:class:`BackdoorMetrics` over batches, in eval mode; ``num_classes=None``: the width of the logits."""
    # Local: under DDP only rank 0 defends and evaluates, so a synchronising compute would wait for the others.
    metrics = BackdoorMetrics(num_classes, target_class, sync_on_compute=False) if num_classes is not None else None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(labels), batch_size):
            part = slice(start, start + batch_size)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = model(_as_float(images[part], device, bf16)).float().cpu()
                trig_logits = (model(_as_float(triggered[part], device, bf16)).float().cpu()
                               if triggered is not None else None)
            if metrics is None:
                metrics = BackdoorMetrics(logits.shape[-1], target_class, sync_on_compute=False)
            metrics.update(logits, labels[part].cpu(), trig_logits,
                           attack_labels[part].cpu() if attack_labels is not None else None)
    finally:
        model.train(was_training)
    if metrics is None:
        raise ValueError("no images to evaluate")
    return metrics.compute()


def _as_float(batch: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    batch = (batch.float() / 255 if batch.dtype == torch.uint8 else batch).to(device)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.dim() == 4 else batch
