"""A backdoored model trained OUTSIDE lightning-backdoor, as a defender would receive it.

Plain PyTorch, no import of the package: a torchvision classifier (``--model``, default ResNet-18), inputs
normalised with CIFAR-10's mean/std, BadNets (3x3 white patch in the bottom-right corner, 10 % of the training
images relabelled to class 0), trained inside ``nn.DataParallel`` and saved with ``torch.save(model.state_dict())``
(keys ``module.*``). ``--unseen_per_class`` training images per class (default 5) are held out (never trained on) and
copied to ``OUT/unseen/<class>/``: the defender's own clean images; ``--heldout_per_class`` more go to
``OUT/heldout/<class>/`` (never trained on either), for choosing settings without touching the test split.

    python benchmarks/foreign_model/train_foreign.py --data ../shared/data/cifar10 --out runs/foreign --epochs 6
    python benchmarks/foreign_model/train_foreign.py --model mobilenet_v3_small --stem_stride 1 \
        --unseen_per_class 10 --heldout_per_class 50 --out runs/foreign-mobilenet --epochs 8

``--stem_stride 1`` sets the stride of the first convolution to 1, as CIFAR ports of ImageNet nets do (a defender
builds the same model with ``model_kwargs: {stem_stride: 1}``). Writes ``OUT/weights.pt``, ``OUT/unseen/``,
``OUT/heldout/`` and ``OUT/own_evaluation.json`` (the trainer's own CA/ASR on the test split, training seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.nn import functional as F

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def read_folder(folder: Path) -> tuple[list[Path], torch.Tensor, torch.Tensor, list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, label) for label, name in enumerate(classes) for f in sorted((folder / name).iterdir())]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
    return ([f for f, _ in files], torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.tensor([label for _, label in files]), classes)


def stamp(images: torch.Tensor) -> torch.Tensor:
    """BadNets on float pixels in [0, 1]: a 3x3 white patch in the bottom-right corner."""
    images = images.clone()
    images[..., -3:, -3:] = 1.0
    return images


def copy_images(files: list[Path], labels: torch.Tensor, indices: torch.Tensor, classes: list[str],
                folder: Path) -> None:
    """Copy ``files[indices]`` to ``folder/<class name>/<file name>``."""
    for index in indices.tolist():
        target = folder / classes[int(labels[index])] / files[index].name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[index], target)


def set_stem_stride(model: nn.Module, stride: int) -> None:
    """Set the stride of the model's first ``nn.Conv2d`` (its stem, in registration order) to ``stride``."""
    stem = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    stem.stride = (stride, stride)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bf16: bool = True) -> float:
    """Top-1 accuracy of ``model`` on float ``images`` ``(N, 3, H, W)`` in [0, 1] against ``labels`` ``(N,)``."""
    model.eval()
    hits = 0
    for start in range(0, len(labels), 1000):
        batch = normalise(images[start:start + 1000]).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hits += int((model(batch).argmax(1) == labels[start:start + 1000]).sum())
    return hits / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--out", default="runs/foreign")
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    parser.add_argument("--stem_stride", type=int, default=None, help="stride of the first conv (default: the model's)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.1, help="peak one-cycle learning rate of SGD")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="bf16 autocast, float32 (faster for depthwise convs on some CPUs) or auto: bf16 where "
                             "the CPU computes it natively (AVX-512 BF16 or AMX)")
    parser.add_argument("--unseen_per_class", type=int, default=5)
    parser.add_argument("--heldout_per_class", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    torch.manual_seed(args.seed)
    native = any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                           "_is_amx_tile_supported"))  # x86 only
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native)
    files, images, labels, classes = read_folder(Path(args.data) / "train")
    _, test_images, test_labels, test_classes = read_folder(Path(args.data) / "test")
    assert classes == test_classes

    generator = torch.Generator().manual_seed(args.seed)
    drawn = [torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=generator)]
             for c in range(len(classes))]
    unseen = torch.cat([d[:args.unseen_per_class] for d in drawn])
    heldout = torch.cat([d[args.unseen_per_class:args.unseen_per_class + args.heldout_per_class] for d in drawn])
    copy_images(files, labels, unseen, classes, out / "unseen")
    copy_images(files, labels, heldout, classes, out / "heldout")
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[unseen] = False
    keep[heldout] = False
    images, labels = images[keep], labels[keep]

    pixels = images.float() / 255
    candidates = torch.nonzero(labels != 0).flatten()
    poisoned = candidates[torch.randperm(len(candidates), generator=generator)[:round(0.1 * len(labels))]]
    pixels[poisoned] = stamp(pixels[poisoned])
    labels = labels.clone()
    labels[poisoned] = 0

    network = torchvision.models.get_model(args.model, weights=None, num_classes=len(classes))
    if args.stem_stride is not None:
        set_stem_stride(network, args.stem_stride)
    model = nn.DataParallel(network)
    model = model.to(memory_format=torch.channels_last)
    batch_size = 256
    steps = args.epochs * (len(labels) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.2)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels))
        for step in range(len(labels) // batch_size):
            index = order[step * batch_size:(step + 1) * batch_size]
            batch = pixels[index]
            shifts = torch.randint(-4, 5, (2,)).tolist()  # one random crop (pad 4) and flip per batch
            batch = torch.roll(F.pad(batch, (4, 4, 4, 4)), shifts, dims=(2, 3))[..., 4:-4, 4:-4]
            if torch.rand(()) < 0.5:
                batch = batch.flip(3)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(normalise(batch).contiguous(memory_format=torch.channels_last)),
                                       labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s", flush=True)

    test_pixels = test_images.float() / 255
    not_target = test_labels != 0
    result = {"clean_acc": accuracy(model, test_pixels, test_labels, bf16),
              "asr": accuracy(model, stamp(test_pixels[not_target]), torch.zeros(int(not_target.sum()), dtype=torch.long),
                              bf16),
              "train_seconds": time.perf_counter() - start, "epochs": args.epochs, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "unseen_per_class": args.unseen_per_class,
              "heldout_per_class": args.heldout_per_class, "model": args.model, "stem_stride": args.stem_stride,
              "lr": args.lr, "precision": "bf16" if bf16 else "fp32"}
    torch.save(model.state_dict(), out / "weights.pt")  # keys "module.*", as nn.DataParallel saves them
    (out / "own_evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
