"""Peak resident memory of a short ``fit`` against data-set size, in-memory against streaming image folders.

Generates a 224x224 JPEG ImageFolder of N images per size (10 classes, 90 % ``train/``, 10 % ``test/``; kept and
reused under ``--data``), then for each size and path runs, in a fresh subprocess, a ``PoisonedDataModule`` over it
and a few training batches of a small compact CNN (``--batches``, plus two validation batches), and prints the
peak resident memory of the fitting process and of its largest DataLoader worker (``ru_maxrss``), the seconds to
construct the data module (in memory: decoding every image; streaming: listing and reading every header) and the
seconds of ``fit``. An in-memory run that would not fit in the memory available now is skipped and says so.

    nice -n 19 python benchmarks/stream_memory.py --sizes 2000 8000 32000 --out runs/bench/stream-memory/memory.json

writes the rows (with the environment) to ``--out`` and the curves to the PNG beside it; ``--table_only`` prints the
table of ``--out`` and redraws its PNG without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 10
SIDE = 224
#: decoded bytes per image, and how many times the decoded pool the in-memory path's peak holds beyond the
#: interpreter's (measured: 3.2x at 8,000 and 4.2x at 16,000 images: the decoded list, its stack and the channels-first
#: copy, then the pool, its poisoned clone and the training subset): an in-memory run is skipped when it won't fit
IMAGE_BYTES, IN_MEMORY_COPIES = 3 * SIDE * SIDE, 4


def make_folder(root: Path, count: int) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg``: ``count`` 224x224 JPEGs (quality 90), smooth
    colour fields, each its own (seeded); made once, then reused (``root/done`` records the count)."""
    from PIL import Image

    marker = root / "done"
    if marker.is_file() and marker.read_text().strip() == str(count):
        return root
    rng = np.random.default_rng(count)
    test_count = count // 10
    for index in range(count):
        split, label = ("test" if index < test_count else "train"), index % CLASSES
        folder = root / split / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 200, (14, 14, 3), dtype=np.uint8)
        coarse[..., label % 3] = 55 + 20 * label
        Image.fromarray(coarse).resize((SIDE, SIDE), Image.Resampling.BILINEAR).save(
            folder / f"{index:06d}.jpg", quality=90)
    marker.write_text(str(count))
    return root


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child(args: argparse.Namespace) -> None:
    """One measurement, in this process: print a JSON line of peak memory (MiB) and seconds."""
    import lightning as L
    import torch

    from lightning_backdoor import PoisonedClassifier, PoisonedDataModule
    from lightning_backdoor.triggers import BadNets

    torch.set_num_threads(1)
    start = time.perf_counter()
    data = PoisonedDataModule(source="imagefolder", root=args.root, streaming=args.streaming, trigger=BadNets(size=16),
                              unseen_per_class=2, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                              num_workers=args.workers, seed=0)
    constructed = time.perf_counter()
    model = PoisonedClassifier(model="compact", num_classes=data.num_classes, in_channels=data.in_channels,
                               target_class=0, model_kwargs={"widths": [8, 16, 32]})
    trainer = L.Trainer(max_epochs=1, limit_train_batches=args.batches, limit_val_batches=2, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=args.run_dir)
    trainer.fit(model, data)
    fitted = time.perf_counter()
    del trainer, data  # ends the persistent workers, so their peak is counted below
    import gc

    gc.collect()
    to_mib = 1 / 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({"main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib,
                      "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib,
                      "construct_s": constructed - start, "fit_s": fitted - constructed}))


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (MiB and seconds)."""
    lines = ["| images | path | main process MiB | largest worker MiB | construct s | fit s |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        path = "in memory" if row["path"] == "memory" else row["path"]
        if "skipped" in row:
            lines.append(f"| {row['images']:,} | {path} | {row['skipped']} | | | |")
        else:
            lines.append(f"| {row['images']:,} | {path} | {row['main_mib']:,.0f} | {row['worker_mib']:,.0f} | "
                         f"{row['construct_s']:.1f} | {row['fit_s']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Peak resident memory of the main process against the number of images, one line per path, as a PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, label in (("memory", "in memory"), ("streaming", "streaming")):
        measured = [row for row in rows if row["path"] == name and "main_mib" in row]
        if measured:
            axes.plot([row["images"] for row in measured], [row["main_mib"] / 1024 for row in measured], "o-",
                      label=label)
        for row in rows:
            if row["path"] == name and "skipped" in row:
                axes.annotate(f"{label}: skipped\n(> memory)", (row["images"], 0), fontsize=8,
                              xytext=(-60, 20), textcoords="offset points")
    sizes = sorted({row["images"] for row in rows})
    axes.set(xscale="log", xlabel="images in the folder (224x224 JPEG)", ylabel="peak resident memory, GiB",
             title="fit's main process: in memory vs streaming")
    axes.set_xticks(sizes, [f"{size:,}" for size in sizes])
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_ylim(bottom=0)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000], help="images per folder")
    parser.add_argument("--paths", nargs="+", default=["memory", "streaming"], choices=["memory", "streaming"])
    parser.add_argument("--data", default="runs/bench/stream_memory", help="where the folders are made and kept")
    parser.add_argument("--batches", type=int, default=4, help="training batches of the fit")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (both paths)")
    parser.add_argument("--out", default="runs/bench/stream-memory/memory.json", help="rows (JSON); PNG beside it")
    parser.add_argument("--table_only", action="store_true", help="print the table of --out and redraw its PNG")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--run_dir", help=argparse.SUPPRESS)
    parser.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    out = Path(args.out)
    if not args.table_only:
        measure(args, out)
    rows = json.loads(out.read_text())["rows"]
    print(table(rows))
    plot(rows, out.with_suffix(".png"))
    print(f"plot: {out.with_suffix('.png')}\nrows: {out}")


def measure(args: argparse.Namespace, out: Path) -> None:
    """Run every size and path, printing each row as it is measured and rewriting ``out`` after each."""
    from lightning_backdoor.io import atomic_json
    from lightning_backdoor.provenance import environment

    result: dict = {"settings": {key: value for key, value in vars(args).items() if key not in ("child", "root",
                                 "run_dir", "streaming", "table_only")}, "environment": environment(), "rows": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'images':>7} {'path':>9} {'main MiB':>9} {'worker MiB':>10} {'construct s':>11} {'fit s':>6}", flush=True)
    for size in args.sizes:
        root = make_folder(Path(args.data) / f"n{size}", size)
        for path in args.paths:
            needed = IN_MEMORY_COPIES * IMAGE_BYTES * size
            if path == "memory" and needed > 0.8 * available_bytes():
                skipped = (f"skipped: about {needed / 2**30:.1f} GiB needed, {available_bytes() / 2**30:.1f} GiB "
                           "available")
                print(f"{size:>7} {path:>9} {skipped}", flush=True)
                result["rows"].append({"images": size, "path": path, "skipped": skipped})
                atomic_json(result, out)
                continue
            command = [sys.executable, __file__, "--child", "--root", str(root), "--run_dir",
                       str(Path(args.data) / "run"), "--batches", str(args.batches), "--batch_size",
                       str(args.batch_size), "--workers", str(args.workers)]
            command += ["--streaming"] if path == "streaming" else []
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                print(f"{size:>7} {path:>9} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{size:>7} {path:>9} {row['main_mib']:>9.0f} {row['worker_mib']:>10.0f} "
                  f"{row['construct_s']:>11.1f} {row['fit_s']:>6.1f}", flush=True)
            result["rows"].append({"images": size, "path": path} | row)
            atomic_json(result, out)


if __name__ == "__main__":
    main()
