"""Batch norm synchronised across DDP processes with the gloo backend (CPU), which ``torch.nn.SyncBatchNorm``
refuses; with NCCL (GPU) Lightning's own ``sync_batchnorm`` is used."""

from __future__ import annotations

import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import Tensor, nn
from torch import distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient of every rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlooSyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are all-reduced (differentiably) over the ranks of the default process
    group, so every rank normalises, and updates its running statistics, as one process would over the global
    batch. In eval mode or a single process it is the batch norm it replaced (``replaced``: that class)."""

    def __init__(self, *args: object, replaced: type[_BatchNorm] = nn.BatchNorm2d, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.replaced = replaced

    def _check_input_dim(self, input: Tensor) -> None:
        self.replaced._check_input_dim(self, input)  # type: ignore[arg-type]

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims, shape = [0, *range(2, input.dim())], (1, -1, *([1] * (input.dim() - 2)))
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # bf16/fp16 statistics in fp32
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])]))
        mean, count = sums[:-1] / sums[-1], sums[-1]
        centred = x - mean.view(shape)
        variance = _AllReduceSum.apply(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = variance.detach() * count / (count - 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output.to(input.dtype)


def swap_batchnorm(module: nn.Module, to_gloo: bool) -> nn.Module:
    """``module`` with its batch norms replaced by :class:`GlooSyncBatchNorm` (``to_gloo``) or back, sharing the
    parameters and buffers (an optimizer may already hold them)."""
    if isinstance(module, _BatchNorm) and to_gloo != isinstance(module, GlooSyncBatchNorm):
        args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        swapped = GlooSyncBatchNorm(*args, replaced=type(module)) if to_gloo else module.replaced(*args)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(swapped, name, getattr(module, name))
        return swapped.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, swap_batchnorm(child, to_gloo))
    return module


class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm`` that also works with CPU DDP: under the gloo backend it uses
    :class:`GlooSyncBatchNorm`, otherwise ``torch.nn.SyncBatchNorm``. The CLI adds it for
    ``--trainer.sync_batchnorm true``; in Python, ``Trainer(sync_batchnorm=True, plugins=[SyncBatchNormPlugin()])``."""

    def apply(self, model: nn.Module) -> nn.Module:
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            return swap_batchnorm(model, to_gloo=True)
        return super().apply(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return super().revert(swap_batchnorm(model, to_gloo=False))
