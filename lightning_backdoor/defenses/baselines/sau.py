"""Shared Adversarial Unlearning (SAU; Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by
Unlearning Shared Adversarial Examples", NeurIPS 2023): find adversarial examples that fool the model and a frozen
copy of it the same way (those a backdoor explains), and unlearn them; settings as in the BackdoorBench toolkit."""

from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_backdoor.defenses.base import DEFENSES, BackdoorKnowledge, Defense, DefenseResult, UnseenData
from lightning_backdoor.defenses.baselines.training import shuffled_batches


def jensen_shannon(logits: Tensor, other_logits: Tensor) -> Tensor:
    """Per-sample Jensen–Shannon divergence (nats) of the two logits' softmax, probabilities clamped ≥ 1e-8; (N,)."""
    p, q = logits.softmax(1).clamp(min=1e-8), other_logits.softmax(1).clamp(min=1e-8)
    log_m = ((p + q) / 2).log()
    return ((p * (p.log() - log_m)).sum(1) + (q * (q.log() - log_m)).sum(1)) / 2


def shared_adversarial_examples(model: nn.Module, reference: nn.Module, images: Tensor, labels: Tensor,
                                epsilon: float, steps: int, step_size: float, beta_adv: float,
                                beta_shared: float) -> Tensor:
    """SAU's shared PGD: images x + δ (‖δ‖∞ ≤ ``epsilon``, clamped to [0, 1]) that both ``model`` and ``reference``
    misclassify, into the same class; detached, same shape as ``images``.

    From δ = +ε, ``steps`` steps δ ← clip(δ − ``step_size`` · sign ∇δ L, −ε, ε) on L = β_adv · L_adv + β_shared · L_js:
    L_adv = −(cross-entropy of each network on the samples it does not yet misclassify) / 2N, L_js = the
    Jensen–Shannon divergence of the two networks' predictions on the samples not yet shared / N; it stops early
    when every sample is shared. "Misclassify" is relative to each network's prediction on ``images``. The
    networks' weights get no gradients; run them in eval mode.
    """
    count = len(labels)
    with torch.no_grad():
        predicted, predicted_reference = model(images).argmax(1), reference(images).argmax(1)
    delta = torch.full_like(images, epsilon)
    for _ in range(steps):
        delta.requires_grad_(True)
        adversarial = (images + delta).clamp(0, 1)
        logits, reference_logits = model(adversarial), reference(adversarial)
        fooled = logits.argmax(1) != predicted
        fooled_reference = reference_logits.argmax(1) != predicted_reference
        shared = fooled & fooled_reference & (logits.argmax(1) == reference_logits.argmax(1))
        if shared.all():
            break
        adversarial_loss = -(F.cross_entropy(logits, labels, reduction="none")[~fooled].sum()
                             + F.cross_entropy(reference_logits, labels, reduction="none")[~fooled_reference].sum()
                             ) / (2 * count)
        agreement_loss = jensen_shannon(logits, reference_logits)[~shared].sum() / count
        loss = beta_adv * adversarial_loss + beta_shared * agreement_loss
        grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - step_size * grad.sign()).clamp(-epsilon, epsilon)
    return (images + delta.detach()).clamp(0, 1)


def shared_loss(logits: Tensor, reference_logits: Tensor, selected: Tensor) -> Tensor:
    """SAU's shared-adversarial loss: −log(1 − q_k) of the model's probability q_k of the reference's class k, summed
    over the ``selected`` samples and divided by all N; taken as the mean of −log(1e-6 + min(Σ_{j≠k} q_j, 0.999)) and
    −log(1 + 1e-6 − max(q_k, 0.001)), equal in exact arithmetic (BackdoorBench's two clamps; the sum over the other
    classes keeps its precision when q_k is near 1)."""
    if not selected.any():
        return logits.new_zeros(())
    target = reference_logits.argmax(1)[:, None]
    probabilities = logits.softmax(1)
    positive = probabilities.gather(1, target).squeeze(1)[selected]
    negative = probabilities.scatter(1, target, 0.0).sum(1)[selected]
    return (-(1e-6 + negative.clamp(max=0.999)).log().sum()
            - (1 + 1e-6 - positive.clamp(min=0.001)).log().sum()) / 2 / len(logits)


@DEFENSES.register("sau")
class SAU(Defense):
    """Each round, for each batch of U (shuffled, no augmentation, eval mode): shared PGD against the model and its
    frozen copy from before the defense (see :func:`shared_adversarial_examples`), then an Adam step on
    λ_clean · CE(x) + λ_adversarial · CE(x + δ) + λ_shared · L_shared, where L_shared (see :func:`shared_loss`)
    pushes the model away from the reference's class on the x + δ that the reference misclassifies (away from both
    the label and its clean prediction). The lr is annealed along a cosine over the rounds; needs no backdoor
    knowledge.

    Deviation: x + δ is clamped to [0, 1] (our models take pixels); BackdoorBench adds δ to the pixels too but
    leaves x + δ unclamped.

    Args:
        rounds: passes over U (BackdoorBench's n_rounds).
        batch_size: images per step.
        lr: Adam learning rate (betas 0.9 / 0.999, no weight decay).
        epsilon: L∞ bound of δ, in pixel units ([0, 1] scale).
        steps: PGD steps per batch.
        step_size: PGD step on δ, in pixel units.
        beta_adv, beta_shared: PGD weights of L_adv and L_js.
        lambda_clean, lambda_adversarial, lambda_shared: weights of the clean, adversarial and shared losses.
    """

    def __init__(self, rounds: int = 100, batch_size: int = 128, lr: float = 1e-4, epsilon: float = 0.2,
                 steps: int = 5, step_size: float = 0.2, beta_adv: float = 0.01, beta_shared: float = 1.0,
                 lambda_clean: float = 1.0, lambda_adversarial: float = 0.0, lambda_shared: float = 1.0) -> None:
        self.rounds, self.batch_size, self.lr = rounds, batch_size, lr
        self.epsilon, self.steps, self.step_size = epsilon, steps, step_size
        self.beta_adv, self.beta_shared = beta_adv, beta_shared
        self.lambda_clean, self.lambda_adversarial, self.lambda_shared = lambda_clean, lambda_adversarial, lambda_shared
        self.check_settings(rounds=rounds >= 1, batch_size=batch_size >= 1, lr=lr > 0, epsilon=epsilon >= 0,
                            steps=steps >= 0, step_size=step_size >= 0)

    def defend(self, model: nn.Module, unseen: UnseenData, knowledge: BackdoorKnowledge | None) -> DefenseResult:
        start = time.perf_counter()
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        details = self.unlearn(model, reference, unseen)
        return DefenseResult(self.name, time.perf_counter() - start, details=details)

    def unlearn(self, model: nn.Module, reference: nn.Module, unseen: UnseenData) -> dict[str, float]:
        """SAU's rounds on ``model`` in place against ``reference`` (which it only reads; :meth:`defend` passes the
        model's copy from before the defense); returns the details: the share of U whose adversarial example was
        shared (both networks fooled into one class) and the share the reference misclassified, in the last round,
        and the last batch's loss."""
        weights = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(weights, lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, self.rounds))
        was_training, reference_was_training = model.training, reference.training
        model.eval()
        reference.eval()
        loss = torch.tensor(float("nan"))
        shared_count = fooled_reference_count = 0
        try:
            for _ in range(self.rounds):
                shared_count = fooled_reference_count = 0
                for batch in shuffled_batches(len(unseen.labels), self.batch_size):
                    images, labels = unseen.images[batch].float(), unseen.labels[batch]
                    adversarial = shared_adversarial_examples(
                        model, reference, images, labels, self.epsilon, self.steps, self.step_size, self.beta_adv,
                        self.beta_shared)
                    logits, adversarial_logits = model(images), model(adversarial)
                    with torch.no_grad():
                        reference_logits = reference(adversarial)
                        reference_clean = reference(images).argmax(1)
                    reference_class = reference_logits.argmax(1)
                    fooled_reference = (reference_class != labels) & (reference_class != reference_clean)
                    loss = (self.lambda_clean * F.cross_entropy(logits, labels)
                            + self.lambda_adversarial * F.cross_entropy(adversarial_logits, labels)
                            + self.lambda_shared * shared_loss(adversarial_logits, reference_logits,
                                                               fooled_reference))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        adversarial_class = adversarial_logits.argmax(1)
                        shared = ((adversarial_class != logits.argmax(1)) & (reference_class != reference_clean)
                                  & (adversarial_class == reference_class))
                        shared_count += int(shared.sum())
                        fooled_reference_count += int(fooled_reference.sum())
                schedule.step()
        finally:
            model.train(was_training)
            reference.train(reference_was_training)
        count = len(unseen.labels)
        return {"shared_share": shared_count / count, "reference_fooled_share": fooled_reference_count / count,
                "final_loss": loss.item()}
