"""Evaluate a plain model on clean and triggered data with the project's metrics (no Trainer needed).

One path for every source of images: :func:`evaluate_batches` reads batches from any re-iterable (a DataLoader that
decodes each batch, or :func:`in_batches` slices of tensors held in memory); :func:`evaluate` and
:func:`clean_accuracy` take tensors and slice them; :func:`evaluate_versions` evaluates several versions of one model
(a defense's stages) in one read of the batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from lightning_backdoor.metrics import BackdoorMetrics

METRIC_NAMES = ("clean_acc", "asr", "asr_floor", "robust_acc", "target_acc")
#: images per forward pass when evaluating tensors (the data module's default ``eval_batch_size``)
EVAL_BATCH_SIZE = 1000

#: one batch: ``(images, labels)`` or ``(images, labels, triggered images, attack labels)``; images (B, C, H, W)
#: uint8 or float pixels in [0, 1], labels and attack labels (B,) int64 (attack label ``-1``: not attacked)
EvalBatch = Sequence[Tensor]
#: runs every version of a model on one batch of images (B, C, H, W) as the model takes them: their logits (B, K),
#: one per version, in a fixed order (e.g. :class:`~lightning_backdoor.defenses.stages.StageVersions`)
Forward = Callable[[Tensor], list[Tensor]]


def in_batches(images: Tensor, labels: Tensor, triggered: Tensor | None = None, attack_labels: Tensor | None = None,
               batch_size: int = EVAL_BATCH_SIZE) -> list[EvalBatch]:
    """Consecutive slices of ``batch_size`` samples (views: nothing copied), as :data:`EvalBatch`; the triggered half
    only when both ``triggered`` and ``attack_labels`` are given. Tensors share their first dimension N."""
    columns = (images, labels) if triggered is None or attack_labels is None else (
        images, labels, triggered, attack_labels)
    return [tuple(column[start:start + batch_size] for column in columns)
            for start in range(0, len(labels), batch_size)]


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, triggered: Tensor | None, attack_labels: Tensor | None,
             num_classes: int, target_class: int | None, batch_size: int = EVAL_BATCH_SIZE, bf16: bool = False
             ) -> dict[str, float | list[float]]:
    """:func:`evaluate_batches` on tensors: images (N, C, H, W) float in [0, 1] or uint8, labels (N,), their
    triggered versions and attack labels (both ``None``: no ASR), ``batch_size`` images per forward pass."""
    return evaluate_batches(model, in_batches(images, labels, triggered, attack_labels, batch_size), num_classes,
                            target_class, bf16)


def evaluate_batches(model: nn.Module, batches: Iterable[EvalBatch], num_classes: int, target_class: int | None,
                     bf16: bool = False, confusion: bool = False,
                     inspect: Callable[[Tensor], None] | None = None) -> dict[str, Any]:
    """CA, ASR, ASR floor, RA, TA (fractions) and per-class accuracy over ``batches`` (:data:`EvalBatch`, read once,
    one at a time: memory held does not grow with the number of images). ASR, ASR floor and RA only when the
    batches carry the triggered half; TA only with a ``target_class``. ``confusion``: also ``confusion``, the clean
    images' (K, K) counts as nested lists, rows the labels, columns the predictions. ``inspect`` is called with
    each batch's clean images as read (e.g. to look for images the defense was fitted on), before the model sees
    them.

    ``bf16`` runs the forward passes under bfloat16 autocast with channels-last inputs, about twice as fast on a CPU
    with native bfloat16 (several times slower where it is emulated: :mod:`lightning_backdoor.precision`); a
    prediction whose two largest logits are within bf16's rounding can flip (on the CIFAR-10 models 0-0.1 % of
    the test images, docs/results/cifar10.md), so the default stays float32.
    """
    return evaluate_versions(model, lambda images: [model(images)], batches, num_classes, target_class, bf16,
                             confusion, inspect)[0]


def evaluate_versions(model: nn.Module, forward: Forward, batches: Iterable[EvalBatch], num_classes: int,
                      target_class: int | None, bf16: bool = False, confusion: bool = False,
                      inspect: Callable[[Tensor], None] | None = None) -> list[dict[str, Any]]:
    """:func:`evaluate_batches` of each version of ``model`` that ``forward`` runs, in one read of ``batches``
    (each batch's images converted once, ``inspect`` called once per batch); one result per version, in
    ``forward``'s order. ``model`` (the live module ``forward`` runs) gives the device and is put in eval mode.

    Raises:
        ValueError: ``batches`` holds no image.
    """
    results = []
    for values in _metrics(model, forward, batches, num_classes, target_class, bf16, confusion, inspect):
        out: dict[str, Any] = {name: values[name].item() for name in METRIC_NAMES if name in values}
        out["per_class_acc"] = values["per_class_acc"].tolist()
        if confusion:
            out["confusion"] = values["confusion"].tolist()
        results.append(out)
    return results


def clean_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """CA (fraction) of ``model`` in eval mode on ``images`` (N, C, H, W) float in [0, 1] or uint8 and ``labels``
    (N,), N >= 1; the classes are as many as the model's logits. The same metric as :func:`evaluate`'s."""
    return _metrics(model, lambda batch: [model(batch)], in_batches(images, labels, batch_size=batch_size), None,
                    None)[0]["clean_acc"].item()


@torch.no_grad()
def _metrics(model: nn.Module, forward: Forward, batches: Iterable[EvalBatch], num_classes: int | None,
             target_class: int | None, bf16: bool = False, confusion: bool = False,
             inspect: Callable[[Tensor], None] | None = None) -> list[dict[str, Tensor]]:
    """:class:`BackdoorMetrics` over ``batches`` of each version ``forward`` runs, ``model`` in eval mode;
    ``num_classes=None``: the width of the logits; ``confusion``: also the clean images' confusion matrix (K, K);
    ``inspect``: called with each batch's images."""
    # Local: under DDP only rank 0 defends and evaluates, so a synchronising compute would wait for the others.
    metrics: list[BackdoorMetrics] = []
    matrices: list[MulticlassConfusionMatrix] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for images, labels, *attack in batches:
            triggered, attack_labels = attack if attack else (None, None)
            if inspect is not None:
                inspect(images)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = [value.float().cpu() for value in forward(_as_float(images, device, bf16))]
                trig_logits = ([value.float().cpu() for value in forward(_as_float(triggered, device, bf16))]
                               if triggered is not None else [None] * len(logits))
            if not metrics:
                width = logits[0].shape[-1] if num_classes is None else num_classes
                metrics = [BackdoorMetrics(width, target_class, sync_on_compute=False) for _ in logits]
                matrices = [MulticlassConfusionMatrix(logits[0].shape[-1], sync_on_compute=False)
                            for _ in logits] if confusion else []
            for index, (metric, version, trig_version) in enumerate(zip(metrics, logits, trig_logits, strict=True)):
                metric.update(version, labels.cpu(), trig_version,
                              attack_labels.cpu() if attack_labels is not None else None)
                if confusion:
                    matrices[index].update(version, labels.cpu())
    finally:
        model.train(was_training)
    if not metrics:
        raise ValueError("no images to evaluate")
    return [metric.compute() | ({"confusion": matrices[index].compute()} if confusion else {})
            for index, metric in enumerate(metrics)]


def _as_float(batch: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    batch = (batch.float() / 255 if batch.dtype == torch.uint8 else batch).to(device)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.dim() == 4 else batch
