"""Training throughput of the Lightning loop against a plain PyTorch loop: same model, data, batch, precision.

Alternates the two loops (``--repeats`` times each, ``--steps`` steps per run after one warm-up step) and prints
images/s of each and their ratio (plain / Lightning; 1.00 means no overhead).

    python benchmarks/loop_overhead.py --steps 30 --repeats 2
    python benchmarks/loop_overhead.py --model preact_resnet18 --model_kwargs '{"width": 1.0}' --batch_size 128 \
        --label_smoothing 0 --steps 20 --repeats 2        # BackdoorBench's PreAct-ResNet18 at batch 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import lightning as L
import torch
from torch.nn import functional as F

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.data import PoisonedDataModule
from lightning_backdoor.data.augment import random_crop, random_flip
from lightning_backdoor.data.poisoning import to_float
from lightning_backdoor.precision import trainer_precision, use_bf16


class StepTimer(L.Callback):
    """Wall time from the end of the first (warm-up) step to the end of the last."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def classifier(args: argparse.Namespace) -> PoisonedClassifier:
    return PoisonedClassifier(model=args.model, model_kwargs=json.loads(args.model_kwargs),
                              label_smoothing=args.label_smoothing)


def plain_loop(data: PoisonedDataModule, steps: int, args: argparse.Namespace) -> float:
    model = classifier(args).net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    start = None
    for step, (images, labels) in enumerate(data.train_dataloader()):
        images = random_flip(random_crop(to_float(images), data.crop_padding))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(None)):  # where the CPU computes it natively
            loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels,
                                   label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            start = time.perf_counter()
        if step == steps:
            break
    return steps * data.batch_size / (time.perf_counter() - start)


def lightning_loop(data: PoisonedDataModule, steps: int, args: argparse.Namespace) -> float:
    timer = StepTimer()
    module = classifier(args)
    trainer = L.Trainer(max_steps=steps + 1, precision=trainer_precision("bf16-mixed", "cpu"), accelerator="cpu",
                        devices=1, logger=False,
                        default_root_dir=tempfile.mkdtemp(prefix="loop_overhead-"),  # the run files go there
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    return steps * data.batch_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="compact", help="a registered model name")
    parser.add_argument("--model_kwargs", default='{"widths": [64, 128, 256]}', help="its settings, as JSON")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--label_smoothing", type=float, default=0.2)
    args = parser.parse_args()
    data = PoisonedDataModule(source="cifar10", root="../shared/data/cifar10", cache_dir="runs/cache",
                              batch_size=args.batch_size, unseen_per_class=50)
    data.setup("fit")
    plain, lightning = [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(data, args.steps, args))
        lightning.append(lightning_loop(data, args.steps, args))
        print(f"plain {plain[-1]:.0f} img/s, lightning {lightning[-1]:.0f} img/s", flush=True)
    ratio = statistics.median(plain) / statistics.median(lightning)
    print(f"median: plain {statistics.median(plain):.0f} img/s, lightning {statistics.median(lightning):.0f} img/s, "
          f"ratio plain/lightning {ratio:.3f}")


if __name__ == "__main__":
    main()
