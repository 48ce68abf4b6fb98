"""Fine-pruning (FP; Liu et al. 2018): prune the last conv layer's dormant channels, then fine-tune."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from lightning_backdoor.defenses.base import DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.baselines.training import accuracy, split_unseen, train


def last_conv_and_norm(model: nn.Module) -> tuple[str, nn.Conv2d, nn.Module | None]:
    """The last Conv2d of ``model`` and the BatchNorm2d that normalises its channels (None if there is none)."""
    modules = list(model.named_modules())
    convs = [index for index, (_, module) in enumerate(modules) if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError("fine-pruning needs a model with a Conv2d layer")
    name, conv = modules[convs[-1]]
    norm = next((module for _, module in modules[convs[-1] + 1:]
                 if isinstance(module, nn.BatchNorm2d) and module.num_features == conv.out_channels), None)
    return name, conv, norm


@DEFENSES.register("fp")
class FinePruning(Defense):
    """Prune the last conv layer's channels in increasing order of their mean activation on clean unseen images,
    as many as keep accuracy on held-out unseen images within ``max_accuracy_drop`` of the unpruned model; then
    fine-tune on all of U with the pruned channels held at zero.

    Args:
        max_accuracy_drop: the pruning stops before held-out accuracy falls by more than this (fraction).
        validation_fraction: share of U held out (per class) to choose the pruning ratio.
        step: channels added per pruning trial (0: 1/64 of the layer).
        epochs, lr, batch_size: the fine-tuning that follows (as in ``ft``).
    """

    def __init__(self, max_accuracy_drop: float = 0.04, validation_fraction: float = 0.5, step: int = 0,
                 epochs: int = 20, lr: float = 0.01, batch_size: int = 64) -> None:
        self.max_accuracy_drop, self.validation_fraction, self.step = max_accuracy_drop, validation_fraction, step
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        start = time.perf_counter()
        layer, conv, norm = last_conv_and_norm(model)
        output = norm if norm is not None else conv
        fit, validation = split_unseen(unseen, self.validation_fraction)
        order = self._activation_order(model, output, fit.images)
        mask = torch.ones(conv.out_channels, device=unseen.images.device)
        hook = output.register_forward_hook(lambda module, inputs, out: out * mask.view(1, -1, 1, 1).to(out.dtype))
        try:
            baseline = accuracy(model, validation.images, validation.labels)
            step = self.step or max(1, conv.out_channels // 64)
            pruned = 0
            for count in range(step, conv.out_channels, step):
                mask.fill_(1.0)
                mask[order[:count]] = 0.0
                if accuracy(model, validation.images, validation.labels) < baseline - self.max_accuracy_drop:
                    break
                pruned = count
        finally:
            hook.remove()
        channels = order[:pruned]

        def zero_pruned() -> None:
            with torch.no_grad():
                for parameter in (output.weight, output.bias):
                    if parameter is not None:
                        parameter[channels] = 0.0

        zero_pruned()
        loss = train(model, unseen, self.epochs, self.lr, self.batch_size, after_step=zero_pruned)
        return DefenseResult(self.name, time.perf_counter() - start, layer=layer, details={
            "pruned_channels": pruned, "pruned_fraction": pruned / conv.out_channels,
            "held_out_accuracy_unpruned": baseline, "final_loss": loss})

    @staticmethod
    @torch.no_grad()
    def _activation_order(model: nn.Module, output: nn.Module, images: Tensor) -> Tensor:
        """Channel indices by increasing mean positive activation of ``output`` on clean images."""
        captured: list[Tensor] = []
        hook = output.register_forward_hook(lambda module, inputs, out: captured.append(out.detach().float()))
        was_training = model.training
        model.eval()
        try:
            model(images.float())
        finally:
            hook.remove()
            model.train(was_training)
        return captured[0].clamp(min=0).mean(dim=(0, 2, 3)).argsort()
