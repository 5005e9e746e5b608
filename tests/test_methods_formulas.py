"""Golden tests 1-3 of methods.md: the uncertainty rules reduce to the simpler methods, and are exact on quadratics
(addition: the joint minimizer; removal: the model retrained without the forget data)."""
from __future__ import annotations

import pytest
import torch

from unmerge.methods.arithmetic import linear, negation, task_arithmetic
from unmerge.methods.fisher import fisher_merge, uncertainty_merge
from unmerge.methods.removal import uncertainty_removal

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=_gen(seed), dtype=D)


def _spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=_gen(seed), dtype=D)
    return a @ a.T + 0.5 * torch.eye(d, dtype=D)


# ---------------------------------------------------------------------------------------------------- test 1
def test_uncertainty_with_zero_fisher_is_task_arithmetic():
    base = _rand(4, 5, seed=0)
    models = [_rand(4, 5, seed=s) for s in (1, 2, 3)]
    zeros = torch.zeros(4, 5, dtype=D)
    got = uncertainty_merge(base, models, zeros, [zeros] * 3, [0.5, 1.5, -0.0], [10.0, 20.0, 5.0], 100.0, 1e-12)
    want = task_arithmetic(base, models, [0.5, 1.5, 0.0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got - base).abs().max() > 0.1  # a real change, not a no-op


def test_uncertainty_without_base_precision_is_fisher_merging():
    base = _rand(6, seed=0)
    models = [_rand(6, seed=s) for s in (1, 2, 3)]
    fishers = [_rand(6, seed=s, low=0.1, high=2.0) for s in (4, 5, 6)]
    counts = [2.0, 3.0, 5.0]
    got = uncertainty_merge(base, models, torch.zeros(6, dtype=D), fishers, [1.0] * 3, counts, 1.0, 0.0)
    want = fisher_merge(models, [n * f for n, f in zip(counts, fishers)], [1.0] * 3, epsilon=1e-6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and by hand: Σ H_t θ_t / Σ H_t
    hs = [n * f for n, f in zip(counts, fishers)]
    torch.testing.assert_close(got, sum(h * m for h, m in zip(hs, models)) / sum(hs), rtol=0, atol=1e-12)


def test_uncertainty_with_equal_isotropic_fishers_is_linear():
    base = _rand(3, 3, seed=0)
    models = [_rand(3, 3, seed=s) for s in (1, 2)]
    iso = torch.full((3, 3), 0.7, dtype=D)
    got = uncertainty_merge(base, models, torch.zeros(3, 3, dtype=D), [iso, iso], [1.0, 1.0], [4.0, 4.0], 1.0, 0.0)
    torch.testing.assert_close(got, linear(models, [1.0, 1.0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, (models[0] + models[1]) / 2, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- test 2
def _finetune(h0: torch.Tensor, c0: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmin ½(θ−c)ᵀH(θ−c) + ½(θ−c₀)ᵀH₀(θ−c₀) (θ₀ = c₀), diagonal (vectors) or full (matrices)."""
    if h.dim() == 1:
        return (h * c + h0 * c0) / (h + h0)
    return torch.linalg.solve(h + h0, h @ c + h0 @ c0)


def test_quadratic_exactness_addition_diagonal():
    d, n_tasks = 9, 3
    c0 = _rand(d, seed=0)
    h0 = _rand(d, seed=1, low=0.2, high=3.0)
    cs = [_rand(d, seed=10 + t) for t in range(n_tasks)]
    hs = [_rand(d, seed=20 + t, low=0.0, high=5.0) for t in range(n_tasks)]
    thetas = [_finetune(h0, c0, h, c) for h, c in zip(hs, cs)]
    joint = (h0 * c0 + sum(h * c for h, c in zip(hs, cs))) / (h0 + sum(hs))
    # H = N·F with N₀ = 50, N_t = (10, 20, 40): the method sees Fishers F = H / N and the counts
    counts = [10.0, 20.0, 40.0]
    got = uncertainty_merge(c0, thetas, h0 / 50, [h / n for h, n in zip(hs, counts)], [1.0] * 3, counts, 50.0, 0.0)
    assert (got - joint).abs().max() < 1e-6
    assert (task_arithmetic(c0, thetas, [1.0] * 3) - joint).abs().max() > 1e-2  # plain addition is not exact


def test_quadratic_exactness_addition_full_matrix():
    d, n_tasks = 6, 3
    c0, h0 = _rand(d, seed=0), _spd(d, 1)
    cs = [_rand(d, seed=10 + t) for t in range(n_tasks)]
    hs = [_spd(d, 20 + t) for t in range(n_tasks)]
    thetas = [_finetune(h0, c0, h, c) for h, c in zip(hs, cs)]
    total = h0 + sum(hs)
    merged = c0 + sum(torch.linalg.solve(total, (h0 + h) @ (theta - c0)) for h, theta in zip(hs, thetas))
    joint = torch.linalg.solve(total, h0 @ c0 + sum(h @ c for h, c in zip(hs, cs)))
    assert (merged - joint).abs().max() < 1e-6
    assert (c0 + sum(theta - c0 for theta in thetas) - joint).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------- test 3
def _removal_problem(full: bool, d: int = 7) -> dict[str, torch.Tensor]:
    """ℓ_r, ℓ_f quadratics; θ_orig = argmin ℓ_r + ℓ_f; H₀ = H_r + H_f; θ_f fine-tuned on ℓ_f from θ_orig."""
    c_r, c_f = _rand(d, seed=1), _rand(d, seed=2, low=1.0, high=3.0)
    h_r = _spd(d, 3) if full else _rand(d, seed=3, low=0.5, high=2.0)
    h_f = _spd(d, 4) if full else _rand(d, seed=4, low=0.1, high=4.0)
    orig = _finetune(h_f, c_f, h_r, c_r)  # argmin ℓ_r + ℓ_f
    h0 = h_r + h_f
    forget = _finetune(h0, orig, h_f, c_f)
    return {"c_r": c_r, "h_r": h_r, "h_f": h_f, "h0": h0, "orig": orig, "forget": forget}


def test_quadratic_removal_full_matrix_is_the_retrain_oracle():
    p = _removal_problem(full=True)
    removed = p["orig"] - torch.linalg.solve(p["h0"] - p["h_f"], (p["h0"] + p["h_f"]) @ (p["forget"] - p["orig"]))
    assert (removed - p["c_r"]).abs().max() < 1e-6  # argmin ℓ_r = c_r
    assert (negation(p["orig"], p["forget"], 1.0) - p["c_r"]).abs().max() > 1e-2


def test_quadratic_removal_diagonal_through_uncertainty_removal():
    p = _removal_problem(full=False)
    got, info = uncertainty_removal(p["orig"], p["forget"], p["h0"], p["h_f"], alpha=1.0, n_base=1.0, n_forget=1.0,
                                    damping=0.0, m_max=None)
    assert (got - p["c_r"]).abs().max() < 1e-6
    assert info["clamped"] == 0 and info["nonpositive"] == 0
    # the same with H = N·F split between counts and Fishers
    scaled, _ = uncertainty_removal(p["orig"], p["forget"], p["h0"] / 300, p["h_f"] / 40, alpha=1.0, n_base=300.0,
                                    n_forget=40.0, damping=0.0, m_max=None)
    assert (scaled - p["c_r"]).abs().max() < 1e-6
    assert (negation(p["orig"], p["forget"], 1.0) - p["c_r"]).abs().max() > 1e-2


def test_linear_regression_removal_with_real_data_is_the_retrain_oracle():
    datasets = pytest.importorskip("sklearn.datasets")
    x_all, y_all = datasets.load_diabetes(return_X_y=True)
    x_all = torch.cat([torch.tensor(x_all, dtype=D), torch.ones(len(x_all), 1, dtype=D)], dim=1)  # + intercept
    y_all = torch.tensor(y_all, dtype=D)
    forget = x_all[:, 2] > x_all[:, 2].quantile(0.75)  # the patients with the highest BMI form the forget set
    x_r, y_r, x_f, y_f = x_all[~forget], y_all[~forget], x_all[forget], y_all[forget]
    h_r, h_f = x_r.T @ x_r, x_f.T @ x_f  # ℓ = ½‖Xθ − y‖²  ⇒  H = XᵀX
    retrained = torch.linalg.solve(h_r, x_r.T @ y_r)
    orig = torch.linalg.solve(h_r + h_f, x_r.T @ y_r + x_f.T @ y_f)
    h0 = h_r + h_f
    tuned = torch.linalg.solve(h_f + h0, x_f.T @ y_f + h0 @ orig)  # argmin ℓ_f + ½(θ−θ_orig)ᵀH₀(θ−θ_orig)
    removed = orig - torch.linalg.solve(h0 - h_f, (h0 + h_f) @ (tuned - orig))
    scale = retrained.abs().max()
    assert (removed - retrained).abs().max() / scale < 1e-6
    assert (negation(orig, tuned, 1.0) - retrained).abs().max() / scale > 1e-2
