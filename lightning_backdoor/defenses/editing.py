"""The two edits of a layer's weight W (c_out, d) as pure functions on keys and values (METHOD.md §3).

Both change W so that triggered keys k* map to target values v* while clean keys k keep W0 k:
- closed form: W1 = W0 + R (A + λ C + ε I)⁻¹ with A = E_w[k* k*ᵀ], C = E[k kᵀ], R = E_w[(v* − W0 k*) k*ᵀ];
- rank r: W1 = W0 + Λ D, the rows of D the top-r directions of the whitened triggered keys, Λ fitted by gradient
  steps on the weighted L1 distance between W1 k* and v*.
Shapes: keys (n, d), targets (n, c_out), preserve_keys (m, d), key_weights (n,) non-negative.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _weights(keys: Tensor, key_weights: Tensor | None) -> Tensor:
    weights = torch.ones(len(keys), device=keys.device) if key_weights is None else key_weights.float()
    if weights.sum() <= 0:
        raise ValueError("the edit has no triggered keys with positive weight")
    return weights / weights.sum()


def second_moment(keys: Tensor) -> Tensor:
    """Uncentred second moment E[k kᵀ] of keys (m, d), as (d, d)."""
    return keys.T @ keys / len(keys)


def closed_form_edit(weight: Tensor, keys: Tensor, targets: Tensor, preserve: Tensor, strength: float,
                     key_weights: Tensor | None = None, ridge: float = 1e-4) -> Tensor:
    """Least-squares ΔW (c_out, d) of the multi-key edit; ``preserve`` is C (d, d) and ``strength`` is λ.

    ``ridge`` (relative to the mean eigenvalue of C) keeps the solve well posed when the unseen keys span few
    directions.
    """
    weights = _weights(keys, key_weights)
    weighted = keys * weights[:, None]
    moment = weighted.T @ keys
    residual = (targets - keys @ weight.T).T @ weighted
    d = weight.shape[1]
    system = moment + strength * preserve
    system.diagonal().add_(ridge * preserve.trace().clamp(min=1e-12) / d)
    return torch.linalg.solve(system, residual.T).T


def rank_r_edit(weight: Tensor, keys: Tensor, targets: Tensor, preserve: Tensor, rank: int,
                key_weights: Tensor | None = None, steps: int = 300, lr: float = 0.05, ridge: float = 1e-4,
                seed: int = 0) -> Tensor:
    """Constrained rank-``rank`` ΔW = Λ D (Bau et al. 2020): D from the whitened triggered keys, Λ by Adam on L1."""
    weights = _weights(keys, key_weights)
    d = weight.shape[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(preserve + ridge * preserve.trace().clamp(min=1e-12) / d
                                                  * torch.eye(d, device=preserve.device))
    inverse_sqrt = eigenvectors @ torch.diag(eigenvalues.clamp(min=1e-12).rsqrt()) @ eigenvectors.T
    whitened = (keys * weights.sqrt()[:, None]) @ inverse_sqrt
    _, _, right = torch.linalg.svd(whitened, full_matrices=False)
    directions = right[:rank] @ inverse_sqrt  # (r, d): back from the whitened space
    projected = keys @ directions.T  # (n, r)
    base = keys @ weight.T
    scale = (targets - base).abs().mean().clamp(min=1e-8) / projected.abs().mean().clamp(min=1e-8)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    coefficients = (torch.randn(weight.shape[0], directions.shape[0], generator=generator) * 1e-3).to(keys.device)
    coefficients.requires_grad_(True)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            outputs = base + scale * projected @ coefficients.T
            loss = ((outputs - targets).abs().mean(dim=1) * weights).sum()
            loss.backward()
            optimizer.step()
    return scale * coefficients.detach() @ directions
