"""A training sampler that makes a DDP run see the batches one process would see."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch import distributed as dist
from torch.utils.data import DistributedSampler


class GlobalBatchSampler(DistributedSampler):
    """Shuffles like ``DataLoader(shuffle=True)`` and splits every global batch of ``world × batch_size`` among the
    ranks, rank ``r`` taking its ``r``-th slice.

    Each epoch's order is ``torch.randperm`` under a seed drawn from torch's global generator, exactly as
    ``RandomSampler`` draws it (rank 0's draw is broadcast, so ranks never disagree), and incomplete global batches
    are dropped. With one process it yields ``RandomSampler``'s indices; with ``w`` processes and ``batch_size / w``
    per rank, optimizer step ``i`` of the DDP run averages gradients over the same images as step ``i`` of the
    single process. Lightning leaves a ``DistributedSampler`` in place instead of wrapping it.
    """

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True)
        self.batch_size = batch_size
        self.steps = len(dataset) // (batch_size * num_replicas)

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        seed = torch.empty((), dtype=torch.int64).random_()  # RandomSampler's draw from the global generator
        if self.num_replicas > 1 and dist.is_available() and dist.is_initialized():
            drawn = [int(seed)]
            dist.broadcast_object_list(drawn, src=0)
            seed = torch.tensor(drawn[0])
        generator = torch.Generator()
        generator.manual_seed(int(seed))
        order = torch.randperm(len(self.dataset), generator=generator)  # type: ignore[arg-type]
        used = order[: self.steps * self.num_replicas * self.batch_size]
        yield from used.view(self.steps, self.num_replicas, self.batch_size)[:, self.rank].reshape(-1).tolist()
