"""A DDP run is the single-process computation split over ranks: the same batches, the same random crops and flips,
batch norm over the global batch (also on CPU/gloo), and the same random stream after initialisation."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import RandomSampler

from lightning_backdoor.classifier import PoisonedClassifier
from lightning_backdoor.data.augment import random_crop, random_flip
from lightning_backdoor.data.sampling import GlobalBatchSampler
from lightning_backdoor.models import build_model
from lightning_backdoor.models.sync_batchnorm import GlooSyncBatchNorm, SyncBatchNormPlugin, swap_batchnorm

DATASET = range(1000)


def test_one_process_draws_random_samplers_order():
    torch.manual_seed(7)
    expected = list(RandomSampler(DATASET))
    torch.manual_seed(7)
    ours = list(GlobalBatchSampler(DATASET, batch_size=128))
    assert len(ours) == 7 * 128  # 1000 // 128 full batches, the rest dropped as drop_last=True drops it
    assert ours == expected[: len(ours)]


def test_ranks_split_every_global_batch_of_one_process():
    torch.manual_seed(3)
    single = list(GlobalBatchSampler(DATASET, batch_size=128))
    ranks = []
    for rank in range(4):
        torch.manual_seed(3)
        ranks.append(list(GlobalBatchSampler(DATASET, batch_size=32, num_replicas=4, rank=rank)))
    assert {len(indices) for indices in ranks} == {7 * 32}
    for step in range(7):
        together = [index for indices in ranks for index in indices[step * 32:(step + 1) * 32]]
        assert together == single[step * 128:(step + 1) * 128]


def test_sharded_augmentation_draws_what_one_process_draws():
    images = torch.rand(8, 3, 16, 16)
    torch.manual_seed(0)
    single = random_flip(random_crop(images, 2))
    parts = []
    for rank in range(2):
        torch.manual_seed(0)
        shard = (rank, 2)
        parts.append(random_flip(random_crop(images[rank * 4:(rank + 1) * 4], 2, shard), shard))
    assert torch.equal(torch.cat(parts), single)
    assert not torch.equal(parts[0], single[4:])  # the ranks really take different draws


def test_training_continues_the_random_stream_left_by_initialisation():
    torch.manual_seed(0)
    module = PoisonedClassifier(num_classes=3, in_channels=1, model_kwargs={"widths": [4, 8, 8]})
    after_init = torch.get_rng_state()
    torch.manual_seed(0)  # what Lightning's DDP does to every rank at launch
    module.setup("fit")
    assert torch.equal(torch.get_rng_state(), after_init)
    torch.manual_seed(1)
    module.setup("fit")  # only once: a second fit is not rewound
    assert not torch.equal(torch.get_rng_state(), after_init)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = build_model("compact", num_classes=10, in_channels=1, widths=[8, 16, 16]).double()
    images, labels = torch.rand(32, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (32,))
    reference = copy.deepcopy(net)
    net = SyncBatchNormPlugin().apply(net)
    assert all(not isinstance(m, nn.BatchNorm2d) for m in net.modules())
    ddp = nn.parallel.DistributedDataParallel(net)
    half = slice(16 * rank, 16 * (rank + 1))
    F.cross_entropy(ddp(images[half]), labels[half]).backward()
    F.cross_entropy(reference(images), labels).backward()
    gradient_error = max(float((a.grad - b.grad).abs().max()) for a, b in zip(net.parameters(), reference.parameters()))
    buffer_error = max(float((a - b).abs().max()) for a, b in zip(net.buffers(), reference.buffers()))
    reverted = SyncBatchNormPlugin().revert(net)
    kinds = {type(m).__name__ for m in reverted.modules() if "Norm" in type(m).__name__}
    Path(folder, f"{rank}.json").write_text(json.dumps([gradient_error, buffer_error, sorted(kinds)]))
    dist.destroy_process_group()


def test_gloo_sync_batchnorm_gives_the_full_batch_gradients_and_statistics(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2)  # raises if a rank fails
    for rank in range(2):
        gradient_error, buffer_error, kinds = json.loads((tmp_path / f"{rank}.json").read_text())
        assert gradient_error < 1e-12 and buffer_error < 1e-12
        assert kinds == ["BatchNorm2d"]


def test_gloo_sync_batchnorm_is_plain_batch_norm_in_one_process():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    synced = swap_batchnorm(copy.deepcopy(plain), to_gloo=True)
    assert isinstance(synced, GlooSyncBatchNorm)
    images = torch.randn(6, 4, 5, 5)
    assert torch.equal(synced(images), plain(images))
    assert torch.equal(synced.running_var, plain.running_var)
