"""What FT-SAM's adaptive SAM step and SAU's shared adversarial unlearning guarantee, on tiny models."""

import copy

import torch
from torch import nn
from torch.nn import functional as F

from lightning_backdoor.defenses import UnseenData
from lightning_backdoor.defenses.baselines import FTSAM, SAU, training
from lightning_backdoor.defenses.baselines.ft_sam import adaptive_sam_gradient
from lightning_backdoor.defenses.baselines.sau import shared_adversarial_examples


def test_ftsam_step_is_the_hand_computed_adaptive_sam_update(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    images, labels = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    weight, bias = (p.detach().clone() for p in model[1].parameters())
    lr, rho, decay = 0.1, 2.0, 5e-4

    def loss(w, b):
        return F.cross_entropy(images.flatten(1) @ w.T + b, labels, label_smoothing=0.1)

    grads = torch.autograd.grad(loss(weight.requires_grad_(), bias.requires_grad_()), (weight, bias))
    weight, bias = weight.detach(), bias.detach()
    norm = torch.cat([(p.abs() * g).flatten() for p, g in zip((weight, bias), grads)]).norm()
    perturbed = [(p + rho * p.pow(2) * g / norm).requires_grad_() for p, g in zip((weight, bias), grads)]
    sharp = torch.autograd.grad(loss(*perturbed), perturbed)
    expected = [p - lr * (g + decay * p) for p, g in zip((weight, bias), sharp)]  # first SGD step: no momentum yet
    plain = [p - lr * (g + decay * p) for p, g in zip((weight, bias), grads)]

    monkeypatch.setattr(training, "shift_and_flip", lambda batch: batch)  # one deterministic full batch
    FTSAM(epochs=1, lr=lr, batch_size=6, rho=rho).defend(model, UnseenData(images, labels), None)
    for parameter, want, other in zip(model[1].parameters(), expected, plain):
        assert torch.allclose(parameter, want, atol=1e-6)
        assert not torch.allclose(parameter, other, atol=1e-4)  # the perturbation mattered


def test_sam_perturbed_pass_leaves_weights_and_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).train()
    images, labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(images), labels).backward()
    state = copy.deepcopy(model.state_dict())
    first = [p.grad.clone() for p in model.parameters()]
    adaptive_sam_gradient(model, training.cross_entropy, images, labels, rho=2.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert any(not torch.allclose(p.grad, g) for p, g in zip(model.parameters(), first))


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3))


def test_sau_shared_pgd_stays_in_the_box_and_sau_leaves_its_reference_alone():
    torch.manual_seed(0)
    images = torch.rand(12, 1, 6, 6).round()  # every pixel at 0 or 1: an unclamped ±ε would leave [0, 1]
    labels = torch.arange(12) % 3
    model, reference = small_net().eval(), small_net().eval()
    adversarial = shared_adversarial_examples(model, reference, images, labels, epsilon=0.2, steps=5,
                                              step_size=0.2, beta_adv=0.01, beta_shared=1.0)
    assert (adversarial - images).abs().max() <= 0.2 + 1e-6 and not torch.equal(adversarial, images)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert all(p.grad is None for p in [*model.parameters(), *reference.parameters()])

    model.train()  # BatchNorm statistics and the mode must come back as they were
    model[0].bias.requires_grad_(False)
    frozen_bias = model[0].bias.clone()
    reference = copy.deepcopy(model)
    before = copy.deepcopy(reference.state_dict())
    unseen = UnseenData(images, labels)
    details = SAU(rounds=2, lr=0.01).unlearn(model, reference, unseen)
    assert all(torch.equal(value, before[key]) for key, value in reference.state_dict().items())
    assert reference.training and model.training and not model[0].bias.requires_grad
    assert torch.equal(model[0].bias, frozen_bias) and not torch.equal(model[0].weight, before["0.weight"])
    assert 0 <= details["shared_share"] <= 1
    result = SAU(rounds=1).defend(model, unseen, None)
    assert result.method == "sau" and model.training and not model[0].bias.requires_grad
