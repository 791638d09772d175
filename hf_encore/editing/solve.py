"""Step 2: the closed-form update of one edited layer (docs/algorithm.md §4), as pure float64 functions.

All three methods are one formula,

    ΔW = R Kᵀ P (P (Λ + K Kᵀ) P + ρ I)⁻¹,        Λ = λ_p C₀ + S_prev,

with P = I for MEMIT / ENCORE (ρ = λ_n: ENCORE's norm term; 0 for plain MEMIT) and P the null-space projector of
C₀ for AlphaEdit (λ_p = 0, ρ = α). For P = I it is MEMIT's R Kᵀ (λ_p C₀ + λ_n I + S_prev + K Kᵀ)⁻¹. For a projector
it equals AlphaEdit's published R Kᵀ P (S_prev P + K Kᵀ P + α I)⁻¹: that solution satisfies Δ = Δ P, so
Δ (M P + α I) = Δ (P M P + α I) with M = S_prev + K Kᵀ, and the symmetric form admits a Cholesky solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import LayerStatistics


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
    *,
    overwrite_preserved: bool = False,
) -> torch.Tensor:
    """ΔW = R Kᵀ P (P (Λ + K Kᵀ) P + ρ I)⁻¹ by a float64 Cholesky solve, on ``preserved``'s device.

    Args:
        keys: K [d_k, n].
        residual: R [d_v, n].
        preserved: Λ = λ_p C₀ + S_prev [d_k, d_k] (symmetric positive semi-definite).
        ridge: ρ ≥ 0 (λ_n, or AlphaEdit's α).
        projector: P [d_k, d_k] or ``None`` for the identity.
        overwrite_preserved: build the system matrix in ``preserved``'s memory (a float64 tensor the caller
            no longer needs): one [d_k, d_k] float64 buffer less (1.6 GB at d_k = 14,336).

    Returns:
        ΔW [d_v, d_k] float64.

    Raises:
        torch.linalg.LinAlgError: the system is not positive definite (no regulariser covers some direction).
    """
    device = preserved.device
    k = keys.to(device, torch.float64)
    a = preserved.addmm_(k, k.T) if overwrite_preserved else torch.addmm(preserved.double(), k, k.T)
    rhs = residual.to(device, torch.float64) @ k.T  # [d_v, d_k]
    if projector is not None:
        p = projector.double()
        a = p @ a @ p
        rhs = rhs @ p
    if ridge:
        a.diagonal().add_(ridge)  # + ρ I, without a [d_k, d_k] identity
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


@dataclass(frozen=True)
class SolveSettings:
    """The method's switches for the closed form (docs/algorithm.md §4, §6)."""

    preservation_weight: float  # w_p (relative) or λ_p (absolute)
    norm_weight: float  # w_n (relative) or λ_n (absolute)
    nullspace_projection: bool  # AlphaEdit's P
    nullspace_threshold: float
    relative: bool  # regularizer_scale == "relative"


def cached_projector(stats: LayerStatistics, threshold: float) -> torch.Tensor:
    """AlphaEdit's P for this C₀ and threshold, computed once and kept on ``stats`` (an eigendecomposition of a
    [d_k, d_k] matrix is the most expensive step of a small batch)."""
    if stats.projector is None or stats.projector_threshold != threshold:
        stats.projector = nullspace_projector(stats.c0, threshold).to(stats.c0.dtype)
        stats.projector_threshold = threshold
    return stats.projector


def layer_update(
    keys: torch.Tensor,
    residual: torch.Tensor,
    stats: LayerStatistics,
    prev_key_moment: torch.Tensor | None,
    settings: SolveSettings,
) -> torch.Tensor:
    """ΔW of one edited layer: the method's regularisers in absolute units, then :func:`solve_update`.

    Args:
        keys: K [d_k, n].
        residual: R [d_v, n].
        stats: C₀ [d_k, d_k] of the layer (and its cached projector).
        prev_key_moment: S_prev [d_k, d_k] (Σ K Kᵀ of earlier batches) or ``None`` before the first.
        settings: the method's switches.

    Returns:
        ΔW [d_v, d_k] float64, on the device C₀ is held on (where the solve runs).

    Raises:
        torch.linalg.LinAlgError: no regulariser covers some key direction.
    """
    c0 = stats.c0
    lam_p, ridge, threshold = absolute_regularisers(
        c0, settings.preservation_weight, settings.norm_weight, settings.nullspace_threshold, settings.relative)
    projector = cached_projector(stats, threshold) if settings.nullspace_projection else None
    # Λ = λ_p C₀ + S_prev in float64, built in place: one [d_k, d_k] float64 buffer besides the stored moments.
    preserved = c0.to(torch.float64, copy=True).mul_(lam_p)
    if prev_key_moment is not None:
        preserved += prev_key_moment.to(c0.device)
    return solve_update(keys, residual, preserved, ridge, projector, overwrite_preserved=True)


def pre_norm_residual(
    mlp_out: torch.Tensor, normalised: torch.Tensor, residual: torch.Tensor, norm_scale: torch.Tensor
) -> torch.Tensor:
    """The change of W_out's output m that moves an RMS norm after it, N(m) = g ⊙ m / rms(m), by ``residual``.

    Gemma-2/3 add N(m), not m, to the residual stream, so MEMIT's "add R to W_out's output" misses. N is
    invariant to the scale of m and its outputs lie on the ellipsoid {g ⊙ u : ‖u‖² = d}: the target y = N(m) + R
    is replaced by the closest point of that ellipsoid (a trust-region problem: u = g ⊙ y / (g² + μ) with the
    multiplier μ found by bisection), and its preimage s·u is taken at the scale s closest to m (least squares;
    rms(m) if that is not positive). The scale of g is fitted to N(m), so ``norm_scale`` may be N applied to
    ones.

    Args:
        mlp_out: m [d_v, n], W_out's current output at the edited positions.
        normalised: N(m) [d_v, n].
        residual: R [d_v, n], the change wanted after the norm.
        norm_scale: g [d_v] (up to a constant factor).

    Returns:
        m' − m [d_v, n].
    """
    m = mlp_out.double()
    normalised = normalised.double()
    g = norm_scale.double().unsqueeze(1)  # [d_v, 1]
    # Fix g's scale by least squares from N(m) = g ⊙ m / rms(m), so "up to a constant factor" is exact.
    unscaled = g * m / m.pow(2).mean(0, keepdim=True).sqrt()
    g = g * (normalised * unscaled).sum() / unscaled.pow(2).sum()
    dim = m.shape[0]
    target = normalised + residual.double()
    gy = g * target  # [d_v, n]
    g2 = g * g
    lo = (-g2.min() + 1e-12 * g2.max()).expand(1, m.shape[1]).clone()
    hi = (gy.norm(dim=0, keepdim=True) / dim ** 0.5 + g2.max()).clone()

    def excess(mu: torch.Tensor) -> torch.Tensor:  # ‖u(μ)‖² − d, decreasing in μ
        return (gy / (g2 + mu)).pow(2).sum(0, keepdim=True) - dim

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = excess(mid) > 0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    u = gy / (g2 + 0.5 * (lo + hi))
    scale = (u * m).sum(0, keepdim=True) / u.pow(2).sum(0, keepdim=True)
    rms_m = m.pow(2).mean(0, keepdim=True).sqrt()
    scale = torch.where(scale > 0, scale, rms_m)
    return scale * u - m
