"""Curvature-weighted merges: Fisher merging (Matena & Raffel, 2022) and uncertainty-based task-vector addition
(Daheim et al., ICLR 2024), both with diagonal Fishers F (means of per-example squared gradients)."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from unmerge.errors import MethodError
from unmerge.methods.registry import Method, Param, TensorTask, register
from unmerge.methods.removal import DAMPING, N_BASE, base_precision

Tensor = torch.Tensor


def fisher_merge(models: list[Tensor], fishers: list[Tensor], weights: list[float], epsilon: float = 1e-6,
                 norms: list[float] | None = None) -> Tensor:
    """θ = Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i with F̃_i = max(F_i, ε), or max(F_i / ‖F_i‖, ε) when the whole-model norms
    ‖F_i‖ are given (``normalize_fisher``)."""
    numerator = torch.zeros_like(models[0])
    denominator = torch.zeros_like(models[0])
    for i, (theta, fisher, w) in enumerate(zip(models, fishers, weights)):
        f = (fisher / norms[i] if norms is not None else fisher).clamp(min=epsilon)
        numerator += w * f * theta
        denominator += w * f
    return numerator / denominator


def fisher_norms(stream: Callable[[], Iterator[TensorTask]]) -> list[float]:
    """‖F_i‖₂ of each model's Fisher over all merged tensors, streamed one tensor at a time."""
    squares: list[float] = []
    for task in stream():
        for i, fisher in enumerate(task.stats["fisher"]):
            if i == len(squares):
                squares.append(0.0)
            squares[i] += float(fisher.double().square().sum())
    return [math.sqrt(s) if s > 0 else 1.0 for s in squares]


def _fisher_prepass(params: dict[str, Any], stream: Callable[[], Iterator[TensorTask]]) -> dict[str, Any]:
    if not params["normalize_fisher"]:
        return {}
    return {"fisher_norms": fisher_norms(stream)}


def _fisher(task: TensorTask) -> Tensor:
    p = task.params
    if sum(p["weight"]) <= 0:
        raise MethodError(f"fisher merge of '{task.name}': the weights sum to zero", "give a positive weight")
    norms = None
    if p["normalize_fisher"]:
        norms = task.context.get("fisher_norms")
        if norms is None:
            raise MethodError(f"normalize_fisher on '{task.name}' needs the whole-model pre-pass",
                              "merge through unmerge.engine.merge_checkpoints")
    return fisher_merge(task.models, task.stats["fisher"], p["weight"], p["epsilon"], norms)


register(Method(
    name="fisher",
    fn=_fisher,
    summary="Fisher-weighted average of the models (Matena & Raffel, 2022)",
    formula="θ = Σ w_i F_i θ_i / Σ w_i F_i,  F_i ← max(F_i [/ ‖F_i‖], ε)",
    params=(
        Param("weight", 1.0, float, "per-model weight w_i", per_model=True, minimum=0.0),
        Param("epsilon", 1e-6, float, "floor ε on the Fisher values", minimum=0.0, min_exclusive=True,
              aliases=("minimal_fisher_weight",)),
        Param("normalize_fisher", False, bool, "divide each model's Fisher by its whole-model L2 norm first",
              aliases=("normalize_fisher_weight",)),
    ),
    needs_base=False,
    stats=("fisher",),
    prepass=_fisher_prepass,
))


def uncertainty_merge(base: Tensor, models: list[Tensor], f0: Tensor, fishers: list[Tensor], alphas: list[float],
                      counts: list[float], n_base: float, damping: float = 1e-12, name: str = "tensor") -> Tensor:
    """θ = θ₀ + Σ_t α_t (H₀ + H_t) / (H₀ + Σ_s α_s H_s) ⊙ τ_t,  H₀ = N₀F₀ + δ,  H_t = N_t F_t."""
    h0, _ = base_precision(f0, n_base, damping)
    hs = [n * f for n, f in zip(counts, fishers)]
    denominator = h0 + sum(a * h for a, h in zip(alphas, hs))
    bad = int((denominator <= 0).sum())
    if bad:
        raise MethodError(f"uncertainty: H₀ + Σ α_s H_s ≤ 0 at {bad} entries of '{name}'",
                          "use a positive damping, or check that the Fishers are not all zero")
    theta = base.clone()
    for model, a, h in zip(models, alphas, hs):
        theta += a * (h0 + h) / denominator * (model - base)
    return theta


def _uncertainty(task: TensorTask) -> Tensor:
    p = task.params
    if p["n_base"] is None or None in p["n"]:
        raise MethodError(f"uncertainty on '{task.name}' needs n_base and n for every model",
                          "pass them, or give Fisher statistics that record N")
    return uncertainty_merge(task.base, task.models, task.stats["base_fisher"][0], task.stats["fisher"], p["alpha"],
                             p["n"], p["n_base"], p["damping"], task.name)


register(Method(
    name="uncertainty",
    fn=_uncertainty,
    summary="add task vectors weighted by their share of the precision (Daheim et al., 2024)",
    formula="θ = θ₀ + Σ_t α_t (H₀ + H_t) / (H₀ + Σ_s α_s H_s) ⊙ τ_t,  H₀ = N₀F₀ + δ,  H_t = N_t F_t",
    params=(
        Param("alpha", 1.0, float, "per-model scale α_t", per_model=True, minimum=0.0),
        Param("n", None, float, "N_t: examples behind model t (default: its Fisher's recorded N)", per_model=True,
              minimum=0.0, min_exclusive=True),
        N_BASE, DAMPING,
    ),
    stats=("fisher", "base_fisher"),
))
