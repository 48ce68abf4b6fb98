"""Evaluate a plain model on clean and triggered data with the project's metrics (no Trainer needed)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_backdoor.metrics import BackdoorMetrics

METRIC_NAMES = ("clean_acc", "asr", "asr_floor", "robust_acc", "target_acc")


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, triggered: Tensor | None, attack_labels: Tensor | None,
             num_classes: int, target_class: int | None, batch_size: int = 1000) -> dict[str, float | list[float]]:
    """CA, ASR, ASR floor, RA, TA (fractions) and per-class accuracy; images float in [0, 1] or uint8."""
    # Local: under DDP only rank 0 defends and evaluates, so a synchronising compute would wait for the others.
    metrics = BackdoorMetrics(num_classes, target_class, sync_on_compute=False)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(labels), batch_size):
            part = slice(start, start + batch_size)
            logits = model(_as_float(images[part], device))
            trig_logits = model(_as_float(triggered[part], device)) if triggered is not None else None
            metrics.update(logits.float().cpu(), labels[part],
                           trig_logits.float().cpu() if trig_logits is not None else None,
                           attack_labels[part] if attack_labels is not None else None)
    finally:
        model.train(was_training)
    values = metrics.compute()
    out: dict[str, float | list[float]] = {name: values[name].item() for name in METRIC_NAMES if name in values}
    out["per_class_acc"] = values["per_class_acc"].tolist()
    return out


def _as_float(batch: Tensor, device: torch.device) -> Tensor:
    return (batch.float() / 255 if batch.dtype == torch.uint8 else batch).to(device)
