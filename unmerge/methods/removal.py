"""Uncertainty-weighted removal of a forget task vector (Daheim et al., ICLR 2024) and its Fisher baseline.

H₀ = N₀ F₀ + δ (base model on the original/retain data), H_f = N_f F_f (forget model on the forget set),
τ_f = θ_f − θ₀.
"""
from __future__ import annotations

import math

import torch

from unmerge.errors import MethodError
from unmerge.methods.arithmetic import ALPHA
from unmerge.methods.registry import Method, Param, TensorTask, register


def base_precision(f0: torch.Tensor, n_base: float, damping: float, rho: float = 0.0) -> tuple[torch.Tensor, int]:
    """H₀ = N₀F₀ + δ, floored at ρ·mean(H₀) when ρ > 0. Returns (H₀, number of floored entries)."""
    h0 = n_base * f0 + damping
    if rho > 0:
        floor = rho * h0.mean()
        floored = int((h0 < floor).sum())
        return torch.clamp(h0, min=floor), floored
    return h0, 0


def removal_multiplier(h0: torch.Tensor, hf: torch.Tensor, alpha: float, m_max: float | None,
                       name: str = "tensor") -> tuple[torch.Tensor, int, int]:
    """m = (H₀ + H_f) / (H₀ − αH_f), clamped to [1, m_max]; a non-positive denominator counts as m_max.

    Returns (m, clamped count, non-positive-denominator count). With ``m_max=None`` a non-positive denominator is
    an error naming the tensor.
    """
    denom = h0 - alpha * hf
    bad = denom <= 0
    n_bad = int(bad.sum())
    if m_max is None:
        if n_bad:
            raise MethodError(
                f"uncertainty_removal: H₀ − αH_f ≤ 0 at {n_bad} entries of '{name}' (α = {alpha})",
                "enable a guard (m_max, rho) or lower alpha",
            )
        return (h0 + hf) / denom, 0, 0
    m = (h0 + hf) / torch.where(bad, torch.ones_like(denom), denom)
    m = torch.where(bad, torch.full_like(m, m_max), m)
    clamped = int(((m > m_max) | bad).sum())
    return m.clamp(1.0, m_max), clamped, n_bad


def uncertainty_removal(base: torch.Tensor, forget: torch.Tensor, f0: torch.Tensor, ff: torch.Tensor, alpha: float,
                        n_base: float, n_forget: float, damping: float = 1e-12, m_max: float | None = 5.0,
                        rho: float = 0.0, name: str = "tensor") -> tuple[torch.Tensor, dict]:
    """θ = θ₀ − α · (H₀ + H_f) / (H₀ − αH_f) ⊙ τ_f, with the guards; returns (θ, diagnostics)."""
    h0, floored = base_precision(f0, n_base, damping, rho)
    hf = n_forget * ff
    m, clamped, nonpos = removal_multiplier(h0, hf, alpha, m_max, name)
    theta = base - alpha * m * (forget - base)
    return theta, {"numel": base.numel(), "clamped": clamped, "nonpositive": nonpos, "floored": floored,
                   "m_mean": float(m.mean()) if m.numel() else 1.0}


def fisher_negation(base: torch.Tensor, forget: torch.Tensor, f0: torch.Tensor, ff: torch.Tensor, alpha: float,
                    n_base: float, n_forget: float, damping: float = 1e-12) -> torch.Tensor:
    """θ = θ₀ − α · H_f / (H₀ + H_f) ⊙ τ_f."""
    h0, _ = base_precision(f0, n_base, damping)
    hf = n_forget * ff
    return base - alpha * hf / (h0 + hf) * (forget - base)


N_BASE = Param("n_base", None, float, "N₀: examples behind the base model (default: the base Fisher's recorded N)",
               minimum=0.0, min_exclusive=True)
N_FORGET = Param("n_forget", None, float, "N_f: forget examples (default: the forget Fisher's recorded N)",
                 minimum=0.0, min_exclusive=True)
DAMPING = Param("damping", 1e-12, float, "δ added to H₀", minimum=0.0)


def _counts(task: TensorTask) -> tuple[float, float]:
    return task.params["n_base"], task.params["n_forget"]


def _uncertainty_removal(task: TensorTask) -> torch.Tensor:
    p = task.params
    m_max = p["m_max"]
    m_max = None if (m_max is None or m_max == 0 or math.isinf(m_max)) else m_max
    n_base, n_forget = _counts(task)
    theta, info = uncertainty_removal(
        task.base, task.models[0], task.stats["base_fisher"][0], task.stats["fisher"][0], p["alpha"], n_base, n_forget,
        p["damping"], m_max, p["rho"], task.name,
    )
    task.record.update(info)
    return theta


def _fisher_negation(task: TensorTask) -> torch.Tensor:
    n_base, n_forget = _counts(task)
    return fisher_negation(task.base, task.models[0], task.stats["base_fisher"][0], task.stats["fisher"][0],
                           task.params["alpha"], n_base, n_forget, task.params["damping"])


register(Method(
    name="uncertainty_removal",
    fn=_uncertainty_removal,
    summary="remove a forget task vector with uncertainty-based weighting (Daheim et al., 2024), guarded",
    formula="θ = θ₀ − α · clamp((H₀ + H_f) / (H₀ − αH_f), 1, m_max) ⊙ τ_f,  H₀ = max(N₀F₀ + δ, ρ·mean),  H_f = N_f F_f",
    params=(
        ALPHA, N_BASE, N_FORGET, DAMPING,
        Param("m_max", 5.0, float, "guard: clamp of the multiplier m (0 or inf = off: a non-positive H₀ − αH_f is "
              "then an error)", minimum=0.0),
        Param("rho", 0.1, float, "guard: floor H₀ at ρ·mean(H₀) per tensor (0 = off; default chosen by "
              "measurement, see README)", minimum=0.0),
    ),
    stats=("fisher", "base_fisher"),
    max_models=1,
))

register(Method(
    name="fisher_negation",
    fn=_fisher_negation,
    summary="subtract the forget task vector weighted by the forget model's share of the precision",
    formula="θ = θ₀ − α · H_f / (H₀ + H_f) ⊙ τ_f",
    params=(ALPHA, N_BASE, N_FORGET, DAMPING),
    stats=("fisher", "base_fisher"),
    max_models=1,
))

REMOVAL_METHODS = ("uncertainty_removal", "negation", "fisher_negation")
