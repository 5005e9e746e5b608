"""Geometric interpolation: SLERP between two models (or their task vectors) and Model Stock (Jang et al., 2024)."""
from __future__ import annotations

import math

import torch

from unmerge.methods.registry import Method, Param, TensorTask, register

Tensor = torch.Tensor


def slerp(a: Tensor, b: Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b with cos Ω = ⟨a/‖a‖, b/‖b‖⟩ over the flattened tensors;
    lerp (1−t)a + t b when |cos Ω| > ``dot_threshold`` (nearly colinear). A vector of norm ≤ eps is not normalized
    (so a zero vector gives cos Ω = 0)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = float(a64.norm()), float(b64.norm())
    cos = float(torch.dot(a64 / (na if na > eps else 1.0), b64 / (nb if nb > eps else 1.0)))
    if abs(cos) > dot_threshold:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def _slerp(task: TensorTask) -> Tensor:
    t = task.params["t"]
    first, second = task.models
    if task.base is None:
        return slerp(first, second, t)
    return task.base + slerp(first - task.base, second - task.base, t)


register(Method(
    name="slerp",
    fn=_slerp,
    summary="spherical interpolation of two models, or of their task vectors when a base is given",
    formula="θ = sin((1−t)Ω)/sin Ω · θ₁ + sin(tΩ)/sin Ω · θ₂ (lerp when |cos Ω| > 0.9995); with a base: "
            "θ = θ₀ + slerp(τ₁, τ₂, t)",
    params=(Param("t", 0.5, float, "interpolation position: 0 = first model, 1 = second", minimum=0.0, maximum=1.0),),
    needs_base=False,
    min_models=2,
    max_models=2,
    symmetric=False,
))


def model_stock(base: Tensor, models: list[Tensor], filter_wise: bool = False) -> Tensor:
    """t = k·cos / (1 + (k−1)·cos), cos = mean pairwise cosine of the k task vectors (clamped to [0, 1], so
    t ∈ [0, 1]; a zero task vector has cos 0); θ = t·mean(θ_i) + (1 − t)·θ₀.

    The cosine is over the whole tensor, or per row along the last dimension with ``filter_wise`` (mergekit).
    """
    shape = base.shape
    rows = (lambda x: x.reshape(-1, shape[-1])) if filter_wise and base.dim() > 1 else (lambda x: x.reshape(1, -1))
    taus = [rows(m - base) for m in models]
    norms = [tau.norm(dim=-1) for tau in taus]
    cosines = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            product = norms[i] * norms[j]
            dot = (taus[i] * taus[j]).sum(-1)
            cosines.append(torch.where(product > 0, dot / torch.where(product > 0, product, 1.0), 0.0))
    cos = torch.stack(cosines).mean(0).clamp(0.0, 1.0).unsqueeze(-1)
    k = len(models)
    t = k * cos / (1 + (k - 1) * cos)
    mean = rows(sum(models) / k)
    return (t * mean + (1 - t) * rows(base)).reshape(shape)


register(Method(
    name="model_stock",
    fn=lambda task: model_stock(task.base, task.models, task.params["filter_wise"]),
    summary="Model Stock: move from the base toward the average by the task vectors' mean angle (Jang et al., 2024)",
    formula="t = k·cos / (1 + (k−1)·cos),  θ = t·mean(θ_i) + (1 − t)·θ₀",
    params=(Param("filter_wise", False, bool, "one cosine per row (last dimension) instead of per tensor"),),
    min_models=2,
))
