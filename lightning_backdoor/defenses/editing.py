"""The two edits of a layer's weight W (c_out, d), as pure functions of key statistics (METHOD.md §3).

Both change W so that triggered keys k* move by ΔW k* towards the residual r = v* − W0 k* (their clean values
minus what the layer outputs now) while clean keys k keep W0 k. Inputs are expectations:
A = E_w[k* k*ᵀ] (d, d), R = E_w[r k*ᵀ] (c_out, d), C = E[k kᵀ] (d, d) over clean keys.
- closed form (multi-key least squares): ΔW = R (A + λ C + ε I)⁻¹, the minimiser of
  E_w‖r − ΔW k*‖² + λ E‖ΔW k‖²;
- rank r (Bau et al. 2020): ΔW = Λ D, the rows of D the top-r directions of the C-whitened triggered keys mapped
  back by C^(−1/2), and Λ the exact minimiser of the same objective restricted to that span (the optimum that
  gradient steps on the L2 distance approach).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


def _regularised(preserve: Tensor, ridge: float) -> Tensor:
    """C + ε I with ε = ``ridge`` × mean eigenvalue of C: few unseen keys leave C singular."""
    return _plus_identity(preserve.clone(), ridge * preserve.trace().clamp(min=1e-12) / preserve.shape[0])


def _plus_identity(matrix: Tensor, scale: Tensor | float) -> Tensor:
    """``matrix`` + ``scale`` I, in place on ``matrix`` (d, d): no d x d identity is built."""
    matrix.diagonal().add_(scale)
    return matrix


def ledoit_wolf(moment: Tensor, fourth: Tensor, count: Tensor | float) -> Tensor:
    """Shrink a second moment S = E[k kᵀ] (d, d) towards (tr S / d) I with the Ledoit–Wolf intensity.

    ``fourth`` is E‖k‖⁴ over the same ``count`` keys. With few unseen images S is rank-deficient, and an edit
    could change the layer freely along directions the unseen keys never visit; shrinkage prices those directions
    at the average key energy, by an amount estimated from the data alone. Returns a new tensor.
    """
    intensity, mean_eigenvalue = shrinkage(moment.trace(), moment.square().sum(), fourth, count, moment.shape[0])
    return _plus_identity(moment * (1 - intensity), intensity * mean_eigenvalue)


def shrinkage(trace: Tensor, squared_norm: Tensor, fourth: Tensor, count: Tensor | float, size: int
              ) -> tuple[Tensor, Tensor]:
    """The Ledoit–Wolf intensity in [0, 1] and the mean eigenvalue tr S / d of a second moment S (d = ``size``) from
    its trace, its squared Frobenius norm ‖S‖²_F, E‖k‖⁴ (``fourth``) and the ``count`` of keys (:func:`ledoit_wolf`)."""
    mean_eigenvalue = trace / size
    dispersion = squared_norm - mean_eigenvalue.square() * size  # ‖S − μ I‖²_F, with tr S = μ d
    sampling = ((fourth - squared_norm) / count).clamp(min=0)  # E‖k kᵀ − S‖²_F / n
    return (sampling.clamp(max=dispersion) / dispersion.clamp(min=1e-12)).clamp(0, 1), mean_eigenvalue


#: the jitter ladder of :func:`positive_definite_factor`: from this fraction of the mean diagonal, doubled per try
JITTER_START, JITTER_TRIES = 1e-4, 14


class JitterWarning(RuntimeWarning):
    """An edit's linear system needed a jitter on its diagonal (:func:`positive_definite_factor`): the edit is
    weaker than asked. The defense report lists it among its warnings."""


def positive_definite_factor(system: Tensor) -> Tensor:
    """The Cholesky factor of ``system`` (d, d), A + λ C + ε I: positive definite in exact arithmetic, but moments
    summed from bfloat16 products (:func:`moment`) are rounded entry by entry (about 2e-3 relative), which can push
    the near-zero eigenvalues of a rank-deficient C (fewer keys than the width d) below zero, by more than ε: on a
    PreAct-ResNet18's ``layer4.1.conv1`` (d = 4,608) with one unseen image per class the smallest eigenvalue was
    −0.056 for a mean diagonal of about 5. Solving that indefinite system anyway gave an edit that sent every image
    to one class. So where the factorisation fails, the smallest jitter of a doubling ladder (from
    ``JITTER_START`` of the mean diagonal, ``JITTER_TRIES`` tries, up to about 0.8 of it) is added to the diagonal,
    and a :class:`JitterWarning` (a :class:`RuntimeWarning`) names it: only when the plain factorisation fails (in
    float32 too, though rounding there stays below ε), and the larger the jitter the weaker the edit (the synthetic
    case in the tests needed 0.2 of the mean diagonal and left 0.63 of the triggered residual where float32 moments
    left 0.35).

    Raises:
        ValueError: the system is not finite, or still not positive definite at the largest jitter.
    """
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() == 0:
        return factor
    if not bool(torch.isfinite(system).all()):
        raise ValueError("the edit's linear system holds NaN or infinite values (non-finite activations at the "
                         "edited layer?)")
    scale = system.diagonal().mean().clamp(min=1e-12)
    for step in range(JITTER_TRIES):
        jitter = scale * JITTER_START * 2 ** step
        factor, info = torch.linalg.cholesky_ex(_plus_identity(system.clone(), jitter))
        if info.item() == 0:
            warnings.warn(f"the edit's system was not positive definite (rounding of its key moments, e.g. in "
                          f"bfloat16); {float(jitter / scale):.2g} of its mean diagonal was added to it, which weakens "
                          f"the edit (bf16=False avoids the rounding)",
                          JitterWarning, stacklevel=3)
            return factor
    raise ValueError("the edit's linear system is not positive definite even with a ridge of "
                     f"{JITTER_START * 2 ** (JITTER_TRIES - 1):.2g} of its mean diagonal")


def second_moment(keys: Tensor) -> Tensor:
    """Uncentred second moment E[k kᵀ] of keys (m, d), as (d, d)."""
    return keys.T @ keys / len(keys)


def moment(left: Tensor, right: Tensor, blocks: int = 4) -> Tensor:
    """Σ_i left_i right_iᵀ (d_l, d_r) in float32 for rows left (m, d_l) and right (m, d_r) of one dtype.

    Float32 products, or bfloat16 products (about twice as fast on CPUs with AVX-512 BF16; each block rounded once to
    bfloat16, relative error about 2e-3, then kept in float32). When ``right`` is ``left`` (a second moment), only
    the blocks on and above the diagonal of a ``blocks`` x ``blocks`` split are multiplied and the rest mirrored:
    10 of 16 products for 4 blocks, the same result."""
    if right is not left or blocks < 2 or left.shape[1] < 2 * blocks:
        return (left.T @ right).float()
    size = left.shape[1]
    result = torch.empty(size, size, device=left.device)
    edges = [size * index // blocks for index in range(blocks + 1)]
    for row, (top, bottom) in enumerate(zip(edges, edges[1:])):
        for start, end in zip(edges[row:], edges[row + 1:]):
            product = (left[:, top:bottom].T @ left[:, start:end]).float()
            result[top:bottom, start:end] = product
            result[start:end, top:bottom] = product.T
    return result


def closed_form_edit(moment: Tensor, residual: Tensor, preserve: Tensor, strength: float,
                     ridge: float = 1e-4) -> Tensor:
    """ΔW (c_out, d) = R (A + λ C + ε I)⁻¹ for A = ``moment``, R = ``residual``, C = ``preserve``, λ = ``strength``."""
    system = _regularised(preserve, ridge).mul_(strength).add_(moment)
    return torch.cholesky_solve(residual.T, positive_definite_factor(system)).T


def rank_r_edit(moment: Tensor, residual: Tensor, preserve: Tensor, rank: int, strength: float,
                ridge: float = 1e-4) -> Tensor:
    """ΔW = Λ D of rank ≤ ``rank``: D from the top eigenvectors of C^(−1/2) A C^(−1/2), Λ fitted in closed form."""
    eigenvalues, eigenvectors = torch.linalg.eigh(_regularised(preserve, ridge))
    inverse_sqrt = eigenvectors @ torch.diag(eigenvalues.clamp(min=1e-12).rsqrt()) @ eigenvectors.T
    _, whitened_directions = torch.linalg.eigh(inverse_sqrt @ moment @ inverse_sqrt)
    directions = (inverse_sqrt @ whitened_directions[:, -rank:]).T  # (r, d), back from the whitened space
    system = directions @ (moment + strength * preserve) @ directions.T  # (r, r), guarded as the closed form's
    return torch.cholesky_solve(directions @ residual.T, positive_definite_factor(system)).T @ directions


def protected_edit(moment: Tensor, residual: Tensor, preserve: Tensor, strength: float, protected: Tensor,
                   ridge: float = 1e-4) -> Tensor:
    """The closed-form edit constrained to leave the directions ``protected`` (d, k; orthonormal columns P) alone:
    argmin E_w‖r − ΔW k*‖² + λ E‖ΔW k‖² subject to ΔW P = 0, which is
    ΔW = R S⁻¹ − R S⁻¹ P (Pᵀ S⁻¹ P)⁻¹ Pᵀ S⁻¹ with S = A + λ C + ε I."""
    system = _regularised(preserve, ridge).mul_(strength).add_(moment)
    factor = positive_definite_factor(system)
    inverse_residual = torch.cholesky_solve(residual.T, factor)  # S⁻¹ Rᵀ (d, c_out)
    inverse_protected = torch.cholesky_solve(protected, factor)  # S⁻¹ P (d, k)
    correction = torch.linalg.solve(protected.T @ inverse_protected, protected.T @ inverse_residual)  # (k, c_out)
    return (inverse_residual - inverse_protected @ correction).T


def key_subspace(moment: Tensor, energy: float) -> Tensor:
    """Orthonormal directions (d, k) of the top eigenvectors of a key second moment (d, d) that together hold at
    least ``energy`` (a fraction) of its trace: where those keys live."""
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp(min=0), eigenvectors.flip(1)
    cumulative = eigenvalues.cumsum(0) / eigenvalues.sum().clamp(min=1e-12)
    count = int((cumulative < energy).sum().item()) + 1
    return eigenvectors[:, :min(count, moment.shape[0])]


@dataclass(frozen=True)
class KeyRows:
    """A sum over keys held as the keys themselves: the rows (m, d), float32, of a second moment Σ_i k_i k_iᵀ, or
    of the residuals r_i (m, c_out) paired row by row with such keys (the cross moment Σ_i r_i k_iᵀ). ``+`` stacks
    the rows, so the sums stay additive over images. While m is below the key width d this is the smaller form,
    and the edit is solved in the m-dimensional span of the keys (:func:`key_space_edit`) instead of d x d."""

    rows: Tensor

    def __add__(self, other: KeyRows) -> KeyRows:
        return KeyRows(torch.cat([self.rows, other.rows]))

    def __len__(self) -> int:
        return len(self.rows)


def key_space_edit(triggered: int, residuals: Tensor, gram: Tensor, scales: Tensor, keys: Tensor,
                   identity: Tensor | float, strength: float) -> Tensor:
    """The closed-form edit ΔW = R (A + λ P)⁻¹ (:func:`closed_form_edit`, P already regularised) for moments given
    by rows: A = Tᵀ T, R = Yᵀ T and P = ι I + Σ_j K_jᵀ K_j. Solved with the m x m Gram matrix of the stacked rows
    U = [T; √λ K_j] (m, d): S = A + λ P = α I + Uᵀ U with α = λ ι, and since R = [Y; 0]ᵀ U,
    ΔW = [Y; 0]ᵀ (α I + U Uᵀ)⁻¹ U (the push-through identity: exact for any m, and no cancellation). Costs
    m² d + m³ instead of the d³ of the dense solve and holds m x d, not d x d: the form for few keys in a wide layer.

    ``keys`` (m, d), float32: the stored rows, T's first (``triggered`` of them), then the K_j's; ``scales`` (m,):
    each row's factor (T = scale ⊙ its rows, K_j likewise; √λ is applied here); ``gram`` = keys keysᵀ (m, m),
    float64; ``residuals`` Y (``triggered``, c_out), already scaled; ``identity``: ι > 0, with the ridge.
    Returns ΔW (c_out, d), float32.
    """
    options = {"dtype": torch.float64, "device": gram.device}
    scales = scales.double() * torch.cat([torch.ones(triggered, **options),
                                          torch.full((len(keys) - triggered,), strength ** 0.5, **options)])
    system = scales[:, None] * gram * scales[None, :]
    system.diagonal().add_(float(strength * identity))
    padded = torch.zeros(len(keys), residuals.shape[1], **options)
    padded[:triggered] = residuals.double()
    factor, info = torch.linalg.cholesky_ex(system)
    coefficients = (torch.cholesky_solve(padded, factor) if info.item() == 0
                    else torch.linalg.solve(system, padded))  # (m, c_out) = (α I + U Uᵀ)⁻¹ [Y; 0]
    return (coefficients * scales[:, None]).T.float() @ keys
