"""Fine-tuning with sharpness-aware minimisation (FT-SAM; Zhu, Wei, Zha & Wu, "Enhancing Fine-Tuning Based Backdoor
Defense with Sharpness-Aware Minimization", ICCV 2023): fine-tune on U with adaptive SAM (ASAM), which the paper
finds to shrink the large norms of backdoor-related neurons; as in the BackdoorBench toolkit's ``ft-sam``."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.defenses.base import DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.baselines.training import LossFn, train


def adaptive_sam_gradient(model: nn.Module, loss_fn: LossFn, images: Tensor, labels: Tensor, rho: float) -> Tensor:
    """Replace the gradients ∇w already in ``model`` by those at the adaptive-SAM point w + e_w; returns that loss.

    e_w = ρ · w² ⊙ ∇w / (‖ |w| ⊙ ∇w ‖₂ + 1e-12), the norm over every parameter that has a gradient. The weights and
    buffers (BatchNorm running statistics) are left exactly as they were: the perturbed pass updates neither.
    """
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not parameters:
        raise ValueError("adaptive SAM needs the gradients of a first backward pass")
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([(p.abs() * p.grad).norm() for p in parameters]))
        scale = rho / (norm + 1e-12)
        weights = [p.detach().clone() for p in parameters]
        buffers = [b.detach().clone() for b in model.buffers()]
        for p in parameters:
            p.add_(p.pow(2) * p.grad * scale)
            p.grad = None
    try:
        loss = loss_fn(model, images, labels)
        loss.backward()
    finally:
        with torch.no_grad():
            for p, weight in zip(parameters, weights):
                p.copy_(weight)
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
    return loss.detach()


@DEFENSES.register("ftsam")
class FTSAM(Defense):
    """Fine-tune every weight on U (train mode, the shift-and-flip augmentation of ``ft``) with adaptive SAM: each
    step takes the label-smoothed cross-entropy's gradient at w + e_w (see :func:`adaptive_sam_gradient`) and
    applies it at w with SGD (momentum 0.9, weight decay 5e-4), the lr annealed along a cosine over the epochs;
    needs no backdoor knowledge.

    Deviation: the paper and BackdoorBench fine-tune 100 epochs with batches of 256 (of 2,500 images); the default
    here is ``ft``'s 20 epochs and batch 64, to keep CPU grids feasible.

    Args:
        epochs: passes over U (paper: 100).
        lr: initial SGD learning rate.
        batch_size: images per step (BackdoorBench: 256).
        rho: ρ, the perturbation's radius in the weight-scaled norm, ‖e_w / |w|‖₂ = ρ (BackdoorBench's rho_max =
            rho_min = 2).
        label_smoothing: smoothing of the cross-entropy's targets, in [0, 1).
    """

    def __init__(self, epochs: int = 20, lr: float = 0.01, batch_size: int = 64, rho: float = 2.0,
                 label_smoothing: float = 0.1) -> None:
        self.epochs, self.lr, self.batch_size, self.rho = epochs, lr, batch_size, rho
        self.label_smoothing = label_smoothing
        self.check_settings(epochs=epochs >= 1, lr=lr > 0, batch_size=batch_size >= 1, rho=rho >= 0,
                            label_smoothing=0 <= label_smoothing < 1)

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        start = time.perf_counter()
        perturbed = [torch.tensor(float("nan"))]

        def loss_fn(network: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
            return F.cross_entropy(network(images), labels, label_smoothing=self.label_smoothing)

        def sam_step(images: Tensor, labels: Tensor) -> None:
            perturbed[0] = adaptive_sam_gradient(model, loss_fn, images, labels, self.rho)

        loss = train(model, unseen, self.epochs, self.lr, self.batch_size, loss_fn=loss_fn, before_step=sam_step,
                     cosine=True)
        return DefenseResult(self.name, time.perf_counter() - start, details={
            "final_loss": loss, "final_perturbed_loss": perturbed[0].item()})
