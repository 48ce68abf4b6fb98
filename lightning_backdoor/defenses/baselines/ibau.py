"""Implicit Backdoor Adversarial Unlearning (I-BAU; Zeng et al. 2022): unlearn universal adversarial
perturbations, with the implicit hypergradient through the inner maximisation."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.defenses.base import DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.baselines.training import shuffled_batches


@DEFENSES.register("ibau")
class IBAU(Defense):
    """Alternate (1) one pass of gradient ascent for a universal perturbation δ (‖δ‖₂ ≤ ``radius``) that makes U
    misclassified and (2) one pass of outer steps that classify U + δ correctly, the outer gradient including
    the implicit term through δ*(θ) (fixed-point map δ ← δ − η∇_δ H_inner, Neumann series of ``neumann_terms``).

    Args:
        rounds: alternations of (1) and (2).
        neumann_terms: K, the fixed-point iterations of the implicit hypergradient.
        lr: Adam learning rate of the model's weights.
        batch_size: images per step.
        radius: the L2 bound C_δ on the perturbation.
        perturbation_lr: SGD learning rate of the perturbation's ascent.
        inner_lr: η of the fixed-point map.
        perturbed_share: share of each outer batch that carries δ (the reference code's ``portion``).
    """

    def __init__(self, rounds: int = 5, neumann_terms: int = 5, lr: float = 0.001, batch_size: int = 100,
                 radius: float = 10.0, perturbation_lr: float = 10.0, inner_lr: float = 0.1,
                 perturbed_share: float = 0.01) -> None:
        self.rounds, self.neumann_terms, self.lr, self.batch_size = rounds, neumann_terms, lr, batch_size
        self.radius, self.perturbation_lr, self.inner_lr = radius, perturbation_lr, inner_lr
        self.perturbed_share = perturbed_share

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        start = time.perf_counter()
        weights = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(weights, lr=self.lr)
        was_training = model.training
        model.eval()
        try:
            for _ in range(self.rounds):
                perturbation = self._universal_perturbation(model, unseen)
                for batch in shuffled_batches(len(unseen.labels), self.batch_size):
                    images, labels = unseen.images[batch].float(), unseen.labels[batch]
                    optimizer.zero_grad(set_to_none=True)
                    outer = self._hypergradient(model, weights, perturbation, images, labels)
                    optimizer.step()
        finally:
            model.train(was_training)
        return DefenseResult(self.name, time.perf_counter() - start, details={
            "perturbation_norm": perturbation.norm().item(), "final_outer_loss": outer})

    def _inner_loss(self, model: nn.Module, perturbation: Tensor, images: Tensor, labels: Tensor) -> Tensor:
        """H_inner(δ, θ): minus the cross-entropy of U + δ, plus a small L2 penalty on δ."""
        return -F.cross_entropy(model(images + perturbation), labels) + 0.001 * perturbation.pow(2).sum()

    def _universal_perturbation(self, model: nn.Module, unseen: UnseenData) -> Tensor:
        """One epoch of SGD on H_inner over U, projected onto the L2 ball; shape (1, C, H, W)."""
        perturbation = torch.zeros_like(unseen.images[:1], dtype=torch.float32, requires_grad=True)
        optimizer = torch.optim.SGD([perturbation], lr=self.perturbation_lr)
        for batch in shuffled_batches(len(unseen.labels), self.batch_size):
            optimizer.zero_grad(set_to_none=True)
            inner = self._inner_loss(model, perturbation, unseen.images[batch].float(), unseen.labels[batch])
            grad, = torch.autograd.grad(inner, perturbation)
            perturbation.grad = grad
            optimizer.step()
        with torch.no_grad():
            perturbation *= min(1.0, self.radius / max(perturbation.norm().item(), 1e-12))
        return perturbation.detach()

    def _hypergradient(self, model: nn.Module, weights: list[Tensor], perturbation: Tensor, images: Tensor,
                       labels: Tensor) -> float:
        """Set ``.grad`` of ``weights`` to dL_outer/dθ = ∂_θ L + (∂_θ Φ)ᵀ Σ_k (∂_δ Φ)ᵀᵏ ∂_δ L; returns L_outer."""
        delta = perturbation.clone().requires_grad_(True)
        carries = torch.zeros(len(labels), 1, 1, 1, device=images.device)
        carries[torch.randperm(len(labels))[:max(1, int(len(labels) * self.perturbed_share))]] = 1.0
        outer = F.cross_entropy(model(images + carries * delta), labels)
        *direct, outer_delta = torch.autograd.grad(outer, [*weights, delta], allow_unused=True)
        # Φ(δ, θ) = δ − η ∇_δ H_inner(δ, θ): its Jacobians give the implicit term.
        inner_grad, = torch.autograd.grad(self._inner_loss(model, delta, images, labels), delta, create_graph=True)
        mapped = delta - self.inner_lr * inner_grad
        vector = torch.zeros_like(delta)
        for _ in range(self.neumann_terms):
            vector = torch.autograd.grad(mapped, delta, grad_outputs=vector, retain_graph=True)[0] + outer_delta
        implicit = torch.autograd.grad(mapped, weights, grad_outputs=vector, allow_unused=True)
        for weight, first, second in zip(weights, direct, implicit):
            total = sum(g for g in (first, second) if g is not None)
            weight.grad = total if isinstance(total, Tensor) else torch.zeros_like(weight)
        return outer.item()
