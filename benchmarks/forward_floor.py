"""The floor of any activation edit at a given budget: seconds of one forward pass over N images of a CIFAR-10 run's
model, in float32 (as the edit's captures run) and in bf16 autocast + channels-last (the fastest on this CPU).

    python benchmarks/forward_floor.py --run runs/cifar10-badnets-u250 --images 2500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_backdoor.runs import instantiate_run, run_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/cifar10-badnets-u250")
    parser.add_argument("--configs", nargs="+", default=["configs/cifar10/base.yaml", "configs/cifar10/badnets.yaml"])
    parser.add_argument("--images", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module, _ = instantiate_run(args.configs, run_checkpoint(Path(args.run)))
    network = module.net.float().eval()
    images = torch.rand(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, bf16 in (("float32", False), ("bf16 + channels_last", True)):
            model = network.to(memory_format=torch.channels_last) if bf16 else network
            for repeat in range(2):  # the first pass warms up the kernels
                started = time.perf_counter()
                for chunk in images.split(500):
                    if bf16:
                        chunk = chunk.contiguous(memory_format=torch.channels_last)
                    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                        model(chunk)
                seconds = time.perf_counter() - started
            print(f"{name}: {seconds:.2f} s per forward pass over {args.images} images "
                  f"({args.images / seconds:.0f} img/s)")


if __name__ == "__main__":
    main()
