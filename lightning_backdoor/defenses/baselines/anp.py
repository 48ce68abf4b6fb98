"""Adversarial Neuron Pruning (ANP; Wu & Wang 2021): prune the BatchNorm neurons most sensitive to perturbation."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_backdoor.defenses.base import DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.baselines.training import accuracy, split_unseen

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@DEFENSES.register("anp")
class ANP(Defense):
    """Learn a mask m ∈ [0, 1] on every BatchNorm neuron that keeps U classified under the worst multiplicative
    perturbation (weight·(m + δ), bias·(1 + ξ), |δ|, |ξ| ≤ ε, one signed ascent step as the paper's code takes);
    then zero the weight of neurons whose mask ends at or below a threshold.

    The paper's code prints ASR and accuracy at pruning thresholds 0.05, 0.10, … 0.90 for the user to pick from
    (the reference toolkit BackdoorBench picks the lowest *test* ASR, a choice made on the test set). Here, with
    ``threshold=None``, the masks are learnt on part of U and the threshold is the largest of those whose pruning
    keeps accuracy on the held-out rest of U within ``max_accuracy_drop`` of the unpruned model's: U only.

    Args:
        epsilon: perturbation budget ε.
        perturbation_steps: gradient-ascent steps on (δ, ξ) per iteration, from a uniform random start.
        alpha: weight of the natural loss against the perturbed loss in the mask objective.
        lr: the mask's SGD learning rate (momentum 0.9).
        iterations: mask-optimisation steps.
        batch_size: images per step.
        threshold: a fixed pruning threshold (the paper's example: 0.2), or None to choose it on held-out U.
        max_accuracy_drop: with ``threshold=None``, the largest held-out accuracy loss (fraction) allowed.
        validation_fraction: with ``threshold=None``, the share of U (per class) held out to choose it.
    """

    THRESHOLDS = tuple(round(0.05 * step, 2) for step in range(1, 19))  # 0.05 ... 0.90, the paper code's sweep

    def __init__(self, epsilon: float = 0.4, perturbation_steps: int = 1, alpha: float = 0.2, lr: float = 0.2,
                 iterations: int = 2000, batch_size: int = 128, threshold: float | None = None,
                 max_accuracy_drop: float = 0.04, validation_fraction: float = 0.5) -> None:
        self.epsilon, self.perturbation_steps, self.alpha, self.lr = epsilon, perturbation_steps, alpha, lr
        self.iterations, self.batch_size, self.threshold = iterations, batch_size, threshold
        self.max_accuracy_drop, self.validation_fraction = max_accuracy_drop, validation_fraction
        self.check_settings(epsilon=epsilon >= 0, perturbation_steps=perturbation_steps >= 1, lr=lr > 0,
                            iterations=iterations >= 1, batch_size=batch_size >= 1,
                            validation_fraction=0 < validation_fraction < 1)

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        start = time.perf_counter()
        norms = {name: module for name, module in model.named_modules()
                 if isinstance(module, NORMS) and module.weight is not None}
        if not norms:
            raise ValueError("ANP needs a model with affine BatchNorm layers")
        device = unseen.images.device
        fit, validation = (unseen, None) if self.threshold is not None else split_unseen(unseen,
                                                                                          self.validation_fraction)
        masks = {name: torch.ones(m.num_features, device=device, requires_grad=True) for name, m in norms.items()}
        weight_noise = {name: torch.zeros(m.num_features, device=device, requires_grad=True)
                        for name, m in norms.items()}
        bias_noise = {name: torch.zeros(m.num_features, device=device, requires_grad=True)
                      for name, m in norms.items()}
        noises = [*weight_noise.values(), *bias_noise.values()]
        mask_optimizer = torch.optim.SGD(masks.values(), lr=self.lr, momentum=0.9)
        noise_optimizer = torch.optim.SGD(noises, lr=self.epsilon / self.perturbation_steps)

        def forward(images: Tensor, perturbed: bool) -> Tensor:
            overrides = {}
            for name, module in norms.items():
                scale = masks[name] + weight_noise[name] if perturbed else masks[name]
                overrides[f"{name}.weight"] = module.weight.detach() * scale
                if module.bias is not None:
                    shift = 1 + bias_noise[name] if perturbed else 1
                    overrides[f"{name}.bias"] = module.bias.detach() * shift
            return functional_call(model, overrides, (images,))

        was_training = model.training
        model.eval()  # running statistics: batch statistics of a few unseen images would be noise
        frozen = [p for p in model.parameters() if p.requires_grad]
        for parameter in frozen:  # only the masks learn; the weights get no gradients
            parameter.requires_grad_(False)
        try:
            for _ in range(self.iterations):
                batch = torch.randperm(len(fit.labels), device=device)[:self.batch_size]
                images, labels = fit.images[batch].float(), fit.labels[batch]
                with torch.no_grad():
                    for noise in noises:
                        noise.uniform_(-self.epsilon, self.epsilon)
                for _ in range(self.perturbation_steps):
                    noise_optimizer.zero_grad(set_to_none=True)
                    (-F.cross_entropy(forward(images, True), labels)).backward()
                    for noise in noises:  # a signed step of ε / steps, as the paper's code: the raw gradients
                        noise.grad.sign_()  # are tiny, and the noise would stay at its random start
                    noise_optimizer.step()
                    with torch.no_grad():
                        for noise in noises:
                            noise.clamp_(-self.epsilon, self.epsilon)
                mask_optimizer.zero_grad(set_to_none=True)
                loss = (self.alpha * F.cross_entropy(forward(images, False), labels)
                        + (1 - self.alpha) * F.cross_entropy(forward(images, True), labels))
                loss.backward()
                mask_optimizer.step()
                with torch.no_grad():
                    for mask in masks.values():
                        mask.clamp_(0, 1)
        finally:
            model.train(was_training)
            for parameter in frozen:
                parameter.requires_grad_(True)
        threshold, held_out = self.threshold, {}
        if threshold is None:
            original = {name: module.weight.detach().clone() for name, module in norms.items()}
            baseline = accuracy(model, validation.images, validation.labels)
            threshold = -1.0  # nothing pruned, unless some threshold keeps the held-out accuracy
            for candidate in self.THRESHOLDS:
                self._prune(norms, masks, candidate)
                held_out[candidate] = accuracy(model, validation.images, validation.labels)
                if held_out[candidate] < baseline - self.max_accuracy_drop:
                    break
                threshold = candidate
            with torch.no_grad():
                for name, module in norms.items():
                    module.weight.copy_(original[name])
        pruned = self._prune(norms, masks, threshold)
        total = sum(m.num_features for m in norms.values())
        return DefenseResult(self.name, time.perf_counter() - start, details={
            "pruned_neurons": sum(pruned.values()), "neurons": total, "threshold": threshold,
            "held_out_accuracy": held_out, "pruned_per_layer": pruned, "final_loss": loss.item()})

    @staticmethod
    @torch.no_grad()
    def _prune(norms: dict[str, nn.Module], masks: dict[str, Tensor], threshold: float) -> dict[str, int]:
        """Zero the BatchNorm weight of every neuron whose mask is <= ``threshold``; the count per layer."""
        pruned = {}
        for name, module in norms.items():
            prune = masks[name] <= threshold
            module.weight[prune] = 0.0
            pruned[name] = int(prune.sum())
        return pruned
