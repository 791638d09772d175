"""Step 2: the closed-form update of one edited layer (ALGORITHM.md §4), as pure float64 functions.

All three methods are one formula,

    ΔW = R Kᵀ P (P (Λ + K Kᵀ) P + ρ I)⁻¹,        Λ = λ_p C₀ + S_prev,

with P = I for MEMIT / ENCORE (ρ = λ_n: ENCORE's norm term; 0 for plain MEMIT) and P the null-space projector of
C₀ for AlphaEdit (λ_p = 0, ρ = α). For P = I it is MEMIT's R Kᵀ (λ_p C₀ + λ_n I + S_prev + K Kᵀ)⁻¹. For a projector
it equals AlphaEdit's published R Kᵀ P (S_prev P + K Kᵀ P + α I)⁻¹: that solution satisfies Δ = Δ P, so
Δ (M P + α I) = Δ (P M P + α I) with M = S_prev + K Kᵀ, and the symmetric form admits a Cholesky solve.
"""

from __future__ import annotations

import torch


def layer_residual(z: torch.Tensor, h: torch.Tensor, layers_left: int) -> torch.Tensor:
    """R = (Z − H) / layers_left: this layer's equal share of the remaining gap. Z, H: [d_v, n] → [d_v, n]."""
    return (z - h) / layers_left


def nullspace_projector(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ over the eigenvectors of C₀ [d_k, d_k] whose eigenvalues are below ``threshold``. → [d_k, d_k]."""
    eigenvalues, eigenvectors = torch.linalg.eigh(c0.double())
    u0 = eigenvectors[:, eigenvalues < threshold]
    return u0 @ u0.T


def solve_update(
    keys: torch.Tensor,
    residual: torch.Tensor,
    preserved: torch.Tensor,
    ridge: float,
    projector: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW = R Kᵀ P (P (Λ + K Kᵀ) P + ρ I)⁻¹ by a float64 Cholesky solve.

    Args:
        keys: K [d_k, n].
        residual: R [d_v, n].
        preserved: Λ = λ_p C₀ + S_prev [d_k, d_k] (symmetric positive semi-definite).
        ridge: ρ ≥ 0 (λ_n, or AlphaEdit's α).
        projector: P [d_k, d_k] or ``None`` for the identity.

    Returns:
        ΔW [d_v, d_k] float64.

    Raises:
        torch.linalg.LinAlgError if the system is not positive definite (no regulariser covers some direction).
    """
    k = keys.double()
    a = preserved.double() + k @ k.T
    rhs = residual.double() @ k.T  # [d_v, d_k]
    if projector is not None:
        p = projector.double()
        a = p @ a @ p
        rhs = rhs @ p
    if ridge:
        a = a + ridge * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    chol = torch.linalg.cholesky(a)
    # ΔW A = rhs with A symmetric  ⇔  A ΔWᵀ = rhsᵀ.
    return torch.cholesky_solve(rhs.T, chol).T


def absolute_regularisers(
    c0: torch.Tensor,
    preservation_weight: float,
    norm_weight: float,
    nullspace_threshold: float,
    relative: bool,
) -> tuple[float, float, float]:
    """(λ_p, ρ, null-space threshold) in absolute units for one layer.

    In relative units λ_p = w_p·d_k and ρ = w_n·tr(C₀), so that for a typical corpus key k (E kᵀC₀⁻¹k = d_k,
    E‖k‖² = tr(C₀)) the preservation and norm terms weigh about 1/w_p and 1/w_n against it, independently of the
    model's key magnitudes; the threshold is relative to tr(C₀)/d_k. C₀: [d_k, d_k].
    """
    if not relative:
        return preservation_weight, norm_weight, nullspace_threshold
    d_k = c0.shape[0]
    trace = float(torch.diagonal(c0).sum())
    return preservation_weight * d_k, norm_weight * trace, nullspace_threshold * trace / d_k
