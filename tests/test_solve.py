"""The closed forms against direct least-squares solves of the stated objectives (docs/algorithm.md §4)."""

from __future__ import annotations

import pytest
import torch

from hf_encore.config import V_LR, EncoreConfig
from hf_encore.editing.solve import (
    absolute_regularisers,
    layer_residual,
    nullspace_projector,
    pre_norm_residual,
    solve_update,
)
from hf_encore.editing.targets import RowAdam, TargetSettings, step_sizes
from hf_encore.editing.tracing import chunk_by_tokens, pad_right

D_K, D_V, N, N_PREV = 12, 7, 4, 6


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(D_K, D_K, generator=g, dtype=torch.float64)
    # A C₀ with a clear null space: 4 tiny eigenvalues.
    q, _ = torch.linalg.qr(basis)
    eig = torch.tensor([1e-4, 2e-4, 5e-4, 1e-3] + [0.5 + i for i in range(D_K - 4)], dtype=torch.float64)
    c0 = q @ torch.diag(eig) @ q.T
    k = torch.randn(D_K, N, generator=g, dtype=torch.float64)
    k_prev = torch.randn(D_K, N_PREV, generator=g, dtype=torch.float64)
    r = torch.randn(D_V, N, generator=g, dtype=torch.float64)
    return c0, k, k_prev, r


def lstsq_right(blocks_x, blocks_y):
    """argmin_W Σ ‖W X_i − Y_i‖², minimum norm: solve [X_1 … X_m]ᵀ Wᵀ = [Y_1 … Y_m]ᵀ by pseudo-inverse."""
    x = torch.cat(blocks_x, dim=1)
    y = torch.cat(blocks_y, dim=1)
    return (torch.linalg.pinv(x.T) @ y.T).T


@pytest.mark.parametrize("lam_p,lam_n", [(3.0, 0.0), (3.0, 0.7), (0.5, 2.0)])
def test_memit_and_encore_match_least_squares(problem, lam_p, lam_n):
    c0, k, k_prev, r = problem
    chol = torch.linalg.cholesky(c0)  # tr(ΔW C₀ ΔWᵀ) = ‖ΔW L‖²
    expected = lstsq_right(
        [k, lam_p**0.5 * chol, k_prev, lam_n**0.5 * torch.eye(D_K, dtype=torch.float64)],
        [r, torch.zeros(D_V, D_K), torch.zeros(D_V, N_PREV), torch.zeros(D_V, D_K)],
    )
    preserved = lam_p * c0 + k_prev @ k_prev.T
    got = solve_update(k, r, preserved, lam_n)
    torch.testing.assert_close(got, expected.double(), rtol=1e-8, atol=1e-9)
    # Built in the caller's buffer (what layer_update does to spare a [d_k, d_k] float64 copy): the same update.
    assert torch.equal(solve_update(k, r, preserved.clone(), lam_n, overwrite_preserved=True), got)


def test_norm_constraint_shrinks_the_update(problem):
    c0, k, k_prev, r = problem
    memit = solve_update(k, r, 2.0 * c0 + k_prev @ k_prev.T, 0.0)
    encore = solve_update(k, r, 2.0 * c0 + k_prev @ k_prev.T, 1.0)
    assert encore.norm() < memit.norm()


@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_alphaedit_matches_least_squares_and_published_formula(problem, alpha):
    c0, k, k_prev, r = problem
    p = nullspace_projector(c0, 1e-2)
    # Objective over Δ: ‖Δ P K − R‖² + ‖Δ P K_prev‖² + α‖Δ P‖²; its minimum-norm minimiser.
    expected = lstsq_right([p @ k, p @ k_prev, alpha**0.5 * p],
                           [r, torch.zeros(D_V, N_PREV), torch.zeros(D_V, D_K)])
    got = solve_update(k, r, k_prev @ k_prev.T, alpha, projector=p)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    # The published closed form, solved without symmetry: R Kᵀ P (S_prev P + K Kᵀ P + α I)⁻¹.
    s_prev = k_prev @ k_prev.T
    a = s_prev @ p + k @ k.T @ p + alpha * torch.eye(D_K, dtype=torch.float64)
    published = torch.linalg.solve(a.T, (r @ k.T @ p).T).T
    torch.testing.assert_close(got, published, rtol=1e-8, atol=1e-10)
    # The update never touches the preserved key space: ΔW leaves C₀'s large directions alone.
    assert (got @ (torch.eye(D_K, dtype=torch.float64) - p)).abs().max() < 1e-10


def test_projector_properties(problem):
    c0, *_ = problem
    threshold = 1e-2
    p = nullspace_projector(c0, threshold)
    torch.testing.assert_close(p, p.T)
    torch.testing.assert_close(p @ p, p, atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(p) == 4
    assert torch.linalg.matrix_norm(c0 @ p, ord=2) < threshold


def test_unregularised_singular_system_raises():
    k = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):
        solve_update(k, torch.randn(3, 2, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64), 0.0)


def test_residual_spreading():
    z, h = torch.full((3, 2), 5.0), torch.ones(3, 2)
    assert torch.equal(layer_residual(z, h, 4), torch.ones(3, 2))


def test_relative_regularisers_scale_with_keys():
    c0 = torch.diag(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    lam_p, ridge, thr = absolute_regularisers(c0, 0.5, 0.1, 1.0, relative=True)
    assert (lam_p, ridge, thr) == (2.0, pytest.approx(1.2), pytest.approx(3.0))
    # Scaling every key by 10 scales C₀ by 100: the relative terms follow, λ_p does not need to.
    lam_p2, ridge2, thr2 = absolute_regularisers(100 * c0, 0.5, 0.1, 1.0, relative=True)
    assert lam_p2 == lam_p and ridge2 == pytest.approx(100 * ridge) and thr2 == pytest.approx(100 * thr)
    assert absolute_regularisers(c0, 15000.0, 20.0, 2e-2, relative=False) == (15000.0, 20.0, 2e-2)


def test_row_adam_matches_torch_adam_and_leaves_other_rows():
    g = torch.Generator().manual_seed(1)
    param = torch.randn(3, 5, generator=g)
    reference = param[1].clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([reference], lr=0.1)
    mine = RowAdam(3, 5, lr=0.1)
    for _ in range(4):
        grad = torch.randn(3, 5, generator=g)
        before = param.clone()
        mine.step(param, grad, torch.tensor([1]))
        reference.grad = grad[1].clone()
        torch_adam.step()
        assert torch.equal(param[0], before[0]) and torch.equal(param[2], before[2])
    torch.testing.assert_close(param[1], reference.detach(), rtol=1e-6, atol=1e-7)


def test_row_adam_takes_a_learning_rate_per_row():
    g = torch.Generator().manual_seed(2)
    param = torch.randn(3, 5, generator=g)
    rates = [0.05, 0.5, 5.0]
    references = [param[i].clone().requires_grad_(True) for i in range(3)]
    optimisers = [torch.optim.Adam([r], lr=lr) for r, lr in zip(references, rates)]
    mine = RowAdam(3, 5, lr=torch.tensor(rates))
    for _ in range(3):
        grad = torch.randn(3, 5, generator=g)
        mine.step(param, grad, torch.arange(3))
        for i, (reference, optimiser) in enumerate(zip(references, optimisers)):
            reference.grad = grad[i].clone()
            optimiser.step()
    for i in range(3):
        torch.testing.assert_close(param[i], references[i].detach(), rtol=1e-6, atol=1e-6)


def test_relative_step_size_follows_the_scale():
    assert EncoreConfig().v_lr == V_LR["relative"]
    assert EncoreConfig(regularizer_scale="absolute").v_lr == V_LR["absolute"] == 0.5
    assert EncoreConfig(v_lr=0.3).with_overrides(regularizer_scale="absolute").v_lr == 0.5
    assert EncoreConfig().with_overrides(v_lr=0.3).v_lr == 0.3


def test_step_sizes_scale_with_the_median_coordinate():
    settings = lambda relative: TargetSettings(0.3, relative, 25, 0.75, 0.5, 0.0625, True, 2, False, 4096)  # noqa: E731
    h = torch.tensor([[1.0, -2.0, 3000.0], [10.0, 20.0, -30.0]])  # one massive channel in the first row
    torch.testing.assert_close(step_sizes(settings(True), h), torch.tensor([0.6, 6.0], dtype=torch.float64))
    torch.testing.assert_close(step_sizes(settings(False), h), torch.tensor([0.3, 0.3], dtype=torch.float64))


def test_padding_and_chunking():
    ids, mask = pad_right([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    chunks = chunk_by_tokens([10, 10, 30, 5], budget=40)
    assert chunks == [[0, 1], [2], [3]]
    assert sum(chunks, []) == [0, 1, 2, 3]


def _rms_norm(m: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """N(m) = g ⊙ m / rms(m) per column of m [d, n] (Gemma's norm without its tiny ε)."""
    return gain.unsqueeze(1) * m / m.pow(2).mean(0, keepdim=True).sqrt()


def test_pre_norm_residual_reaches_a_reachable_target():
    g = torch.Generator().manual_seed(3)
    gain = 0.5 + torch.rand(D_V, generator=g, dtype=torch.float64)
    m = torch.randn(D_V, N, generator=g, dtype=torch.float64)
    wanted = m + 0.3 * torch.randn(D_V, N, generator=g, dtype=torch.float64)
    residual = _rms_norm(wanted, gain) - _rms_norm(m, gain)
    # Only the gain's shape matters: pass it scaled, as N(ones) of a norm with ε would give it.
    change = pre_norm_residual(m, _rms_norm(m, gain), residual, 0.9 * gain)
    torch.testing.assert_close(_rms_norm(m + change, gain), _rms_norm(wanted, gain))
    # Adding R to m itself (the plain rule) misses the target.
    assert (_rms_norm(m + residual, gain) - _rms_norm(wanted, gain)).norm() > 1e-2


def test_pre_norm_residual_takes_the_closest_reachable_output_and_scale():
    g = torch.Generator().manual_seed(4)
    gain = torch.randn(D_V, generator=g, dtype=torch.float64)  # some gains near zero, as in real models
    m = torch.randn(D_V, N, generator=g, dtype=torch.float64)
    target = _rms_norm(m, gain) + 0.5 * torch.randn(D_V, N, generator=g, dtype=torch.float64)  # unreachable
    new = m + pre_norm_residual(m, _rms_norm(m, gain), target - _rms_norm(m, gain), gain)
    reached = _rms_norm(new, gain)
    # No output of the norm lies closer to the target (random directions, 2000 per column).
    u = torch.randn(2000, D_V, N, generator=g, dtype=torch.float64)
    others = gain[None, :, None] * u / u.pow(2).mean(1, keepdim=True).sqrt()
    closest_other = (others - target).norm(dim=1).min(0).values
    assert ((reached - target).norm(dim=0) <= closest_other + 1e-9).all()
    # Least squares in the scale: the remaining change is orthogonal to the new output.
    torch.testing.assert_close((new * (new - m)).sum(0), torch.zeros(N, dtype=torch.float64), atol=1e-10, rtol=0)
