"""Whether bfloat16 pays off on this CPU: seconds of the work the tool does in bf16 where it can, in float32 and
in bfloat16 (autocast + channels-last), alternated and repeated, with the median ratio. Untrained weights (the
cost does not depend on them); prints whether torch sees native bfloat16 (lightning_backdoor.precision).

    python benchmarks/bf16_speed.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from lightning_backdoor.models.registry import build_model
from lightning_backdoor.precision import native_bf16
from lightning_backdoor.provenance import environment


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    net = build_model("compact", 10, widths=[64, 128, 256]).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    batch = torch.rand(128, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (128,), generator=generator)
    images = torch.rand(500, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    keys = torch.rand(2304, 5000, generator=generator)

    def step(bf16: bool) -> None:  # one training step of the CIFAR configs' compact net, batch 128
        net.train()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def forward(bf16: bool) -> None:  # a forward pass over 500 images (evaluation, the edit's captures)
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            net(images)

    def gram(bf16: bool) -> None:  # a key moment: 5,000 keys of width 2,304 (the compact net's last conv)
        chosen = keys.to(torch.bfloat16) if bf16 else keys
        chosen @ chosen.T

    print(f"native bfloat16: {native_bf16('cpu')}; {torch.get_num_threads()} threads; "
          f"torch {environment()['packages']['torch']}; {environment()['platform']}")
    for name, work in (("training step, batch 128", step), ("forward pass, 500 images", forward),
                       ("key Gram matrix, 2304 x 5000", gram)):
        work(False), work(True)  # warm-up
        pairs = [(seconds(lambda: work(False)), seconds(lambda: work(True))) for _ in range(args.repeats)]
        ratio = statistics.median(bf16 / fp32 for fp32, bf16 in pairs)
        print(f"{name}: float32 {statistics.median(p[0] for p in pairs):.3f} s, bf16 "
              f"{statistics.median(p[1] for p in pairs):.3f} s, bf16/float32 {ratio:.2f}x (median of {len(pairs)})")


if __name__ == "__main__":
    main()
