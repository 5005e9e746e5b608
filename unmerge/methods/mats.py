"""MaTS: merging by matching models in task parameter subspaces (Tam et al., TMLR 2024).

Per tensor, solve the merging normal equations (Σ_i C_i) θ = Σ_i C_i θ_i by conjugate gradient, matrix-free (only
products X ↦ C_i X are formed), from an initialization θ⁽⁰⁾ (``init``: task_arithmetic θ₀ + λ Σ τ_t with λ = 0.3,
average, base, or checkpoint: the tensor of the same name in the checkpoint ``init_model``, read one tensor at a
time from its memory-mapped safetensors and checked for shape). C_i is model i's curvature, by ``objective``:

- ``fisher``:  C_i = diag F_i,              X ↦ Σ_i F_i ⊙ X   (every tensor with a Fisher, embeddings excepted);
- ``regmean``: C_i = the input Gram G_i,   X ↦ (Σ_i G_i) X for a Conv1D weight [in, out], X (Σ_i G_i) for an
  ``nn.Linear`` weight [out, in]  (this objective at convergence is ``regmean`` with a = 1 and no ridge);
- ``kfac``:    C_i = A_i ⊗ G_i (K-FAC),     X ↦ Σ_i A_i X G_i for a Conv1D weight, Σ_i G_i X A_i for an nn.Linear one.

The K-FAC product, derived: for one token with layer input x and output gradient g, the weight gradient is x gᵀ for
Conv1D (W is [in, out]) and g xᵀ for nn.Linear (W is [out, in]). With row-major vec, vec(x gᵀ) = x ⊗ g, so the
Fisher E[vec vecᵀ] ≈ E[x xᵀ] ⊗ E[g gᵀ] = A ⊗ G, and (A ⊗ G) vec(X) = vec(A X Gᵀ) = vec(A X G) (G symmetric). For
nn.Linear vec(g xᵀ) = g ⊗ x, giving G ⊗ A and G X A: the same product on the transposed weight. A layer with a bias
has A over [x, 1] (the homogeneous coordinate); the weight's block of the curvature is A's [in, in] block, used here
(``bias_coordinate: dropped`` in the record) while the bias, like every tensor that is not a linear-layer weight
under the regmean / kfac objectives, keeps the initialization.

Embeddings and position embeddings never go through the solver (they keep the initialization); a tied ``lm_head``
is merged once, as the embedding, by the engine. Since the CG iterates stay in θ⁽⁰⁾ + range(Σ C_i), directions in
the null space of Σ C_i (inputs no model ever saw, zero Fisher entries) keep their initial value. Each tensor's
record holds the rule used, the CG iteration count and the final relative residual ‖b − Mθ‖ / ‖b‖ (float64).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch

from unmerge.errors import MethodError
from unmerge.methods.arithmetic import task_arithmetic
from unmerge.methods.registry import Method, Param, TensorTask, register
from unmerge.methods.regmean import input_axis, is_embedding, to_in_out

Tensor = torch.Tensor
Matvec = Callable[[Tensor], Tensor]

OBJECTIVES: dict[str, tuple[str, ...]] = {"fisher": ("fisher",), "regmean": ("gram",), "kfac": ("kfac",)}
INITS = ("task_arithmetic", "average", "base", "checkpoint")


@dataclass(frozen=True)
class ObjectiveMethod(Method):
    """A method whose statistics depend on its parameters: ``stats_for(params)`` → statistic kinds (read by
    ``unmerge.engine.required_stats``); ``stats`` holds those of the defaults."""

    stats_for: Callable[[dict[str, Any]], tuple[str, ...]] | None = None


def conjugate_gradient(matvec: Matvec, b: Tensor, x0: Tensor, iterations: int = 100,
                       rtol: float = 1e-6) -> tuple[Tensor, int, float]:
    """Solve M x = b (M symmetric positive semi-definite, given as ``matvec``) from ``x0``.

    Stops when ‖b − M x‖ ≤ rtol·‖b‖ or after ``iterations`` steps; returns (x, steps taken, final relative residual
    recomputed as ‖b − M x‖ / ‖b‖, or relative to the initial residual when b = 0)."""
    x = x0.clone()
    r = b - matvec(x)
    scale = float(b.norm()) or float(r.norm()) or 1.0
    p = r.clone()
    rs = float((r * r).sum())
    steps = 0
    while steps < iterations and rs**0.5 > rtol * scale:
        mp = matvec(p)
        curvature = float((p * mp).sum())
        if curvature <= 0:  # p in the null space of M: nothing left to solve along it
            break
        step = rs / curvature
        x += step * p
        r -= step * mp
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
        steps += 1
    return x, steps, float((b - matvec(x)).norm()) / scale


def initialization(base: Tensor | None, models: list[Tensor], init: str, lam: float = 0.3) -> Tensor:
    """task_arithmetic: θ₀ + λ Σ_t τ_t; average: mean θ_i; base: θ₀."""
    if init == "average":
        return sum(models) / len(models)
    if base is None:
        raise MethodError(f"mats init '{init}' needs a base model", "set base_model, or use init: average")
    if init == "base":
        return base.clone()
    return task_arithmetic(base, models, [1.0] * len(models), lam)


@lru_cache(maxsize=4)
def _init_checkpoint(path: str):
    from unmerge.checkpoint import Checkpoint

    return Checkpoint(path)


def checkpoint_init(task: TensorTask) -> Tensor:
    """θ⁽⁰⁾ = the tensor ``task.name`` of the checkpoint ``init_model`` (fp32, on the models' device)."""
    path = task.params.get("init_model")
    if not path:
        raise MethodError("mats init 'checkpoint' needs init_model", "set init_model: PATH of the initial model")
    ckpt = _init_checkpoint(str(path))
    if task.name not in ckpt.names():
        raise MethodError(f"the init_model '{path}' has no tensor '{task.name}'",
                          "give a checkpoint of the same architecture as the merged models")
    init = ckpt.get(task.name)
    if tuple(init.shape) != tuple(task.models[0].shape):
        raise MethodError(f"tensor '{task.name}' of init_model '{path}' has shape {tuple(init.shape)}, the models "
                          f"{tuple(task.models[0].shape)}", "give a checkpoint of the same architecture")
    return init.to(task.models[0].device, torch.float32)


def mats_solve(operators: list[Matvec], models: list[Tensor], x0: Tensor, iterations: int = 100,
               rtol: float = 1e-6) -> tuple[Tensor, int, float]:
    """CG on (Σ_i C_i) θ = Σ_i C_i θ_i with C_i given as products ``operators[i]`` (float64 throughout)."""
    b = sum(op(m.double()) for op, m in zip(operators, models))
    return conjugate_gradient(lambda x: sum(op(x) for op in operators), b, x0.double(), iterations, rtol)


def fisher_operators(fishers: list[Tensor]) -> list[Matvec]:
    return [lambda x, f=f.double(): f * x for f in fishers]


def gram_operators(grams: list[Tensor]) -> list[Matvec]:
    """X ↦ G_i X on weights in the [in, out] orientation."""
    return [lambda x, g=g.double(): g @ x for g in grams]


def kfac_operators(a_factors: list[Tensor], g_factors: list[Tensor]) -> list[Matvec]:
    """X ↦ A_i X G_i on weights in the [in, out] orientation (A_i restricted to the weight's inputs)."""
    return [lambda x, a=a.double(), g=g.double(): a @ x @ g for a, g in zip(a_factors, g_factors)]


def _layer_system(task: TensorTask, objective: str) -> tuple[list[Matvec], int] | None:
    """(operators on the [in, out] orientation, input axis) for a linear-layer weight, None if it has no factors."""
    shape = task.models[0].shape
    if objective == "regmean":
        grams = task.stats.get("gram")
        if grams is None:
            return None
        axis = input_axis(task, lambda ax: shape[ax] == grams[0].shape[0], "Gram")
        return gram_operators(grams), axis
    a_factors, g_factors = task.stats.get("kfac.A"), task.stats.get("kfac.G")
    if a_factors is None or g_factors is None:
        return None
    a_dim, g_dim = a_factors[0].shape[0], g_factors[0].shape[0]
    axis = input_axis(task, lambda ax: a_dim in (shape[ax], shape[ax] + 1) and g_dim == shape[1 - ax], "K-FAC")
    n_in = shape[axis]
    if a_dim == n_in + 1:
        task.record["bias_coordinate"] = "dropped"
        a_factors = [a[:n_in, :n_in] for a in a_factors]
    return kfac_operators(a_factors, g_factors), axis


def _mats(task: TensorTask) -> Tensor:
    p = task.params
    objective = p["objective"]
    if p.get("init_model") and p["init"] != "checkpoint":
        raise MethodError(f"mats init_model is set but init is '{p['init']}'", "set init: checkpoint to start from it")
    if p["init"] == "checkpoint":
        x0 = checkpoint_init(task)
    else:
        x0 = initialization(task.base, task.models, p["init"], p["lambda"])
    task.record.update(objective=objective, init=p["init"])
    if is_embedding(task.name):
        task.record.update(rule="init", reason="embedding")
        return x0
    if objective == "fisher":
        fishers = task.stats.get("fisher")
        if fishers is None:
            task.record.update(rule="init", reason="no fisher statistic")
            return x0
        x, steps, residual = mats_solve(fisher_operators(fishers), task.models, x0, p["iterations"], p["rtol"])
    else:
        system = _layer_system(task, objective)
        if system is None:
            kind = OBJECTIVES[objective][0]
            task.record.update(rule="init", reason=f"no {kind} statistic (not a linear-layer weight)")
            return x0
        operators, axis = system
        x, steps, residual = mats_solve(operators, [to_in_out(m, axis) for m in task.models], to_in_out(x0, axis),
                                        p["iterations"], p["rtol"])
        x = to_in_out(x, axis).contiguous()
        task.record["weight_layout"] = "in_out" if axis == 0 else "out_in"
    task.record.update(rule="cg", iterations=steps, residual=residual)
    return x.to(task.models[0].dtype)


OBJECTIVE = Param("objective", "fisher", str, "curvature C_i: fisher (diagonal Fisher), regmean (input Gram), kfac "
                  "(K-FAC A_i ⊗ G_i)", choices=tuple(OBJECTIVES))


def _stats_for(params: dict[str, Any]) -> tuple[str, ...]:
    return OBJECTIVES[OBJECTIVE.check(params["objective"], "mats")]


register(ObjectiveMethod(
    name="mats",
    fn=_mats,
    summary="solve Σ C_i θ = Σ C_i θ_i per tensor by conjugate gradient (Tam et al., 2024); statistics per objective: "
            "fisher, gram (regmean) or kfac",
    formula="(Σ_i C_i) θ = Σ_i C_i θ_i by CG from θ⁽⁰⁾;  C_i = diag F_i | G_i | A_i ⊗ G_i;  others: θ⁽⁰⁾",
    params=(
        OBJECTIVE,
        Param("init", "task_arithmetic", str, "initialization θ⁽⁰⁾: task_arithmetic, average, base or checkpoint "
              "(init_model)", choices=INITS),
        Param("init_model", None, str, "init: checkpoint: the model directory θ⁽⁰⁾ is read from, per tensor",
              input_checkpoint=True),
        Param("lambda", 0.3, float, "λ of the task_arithmetic initialization", aliases=("scaling_coef",)),
        Param("iterations", 100, int, "maximum CG iterations per tensor", minimum=0),
        Param("rtol", 1e-6, float, "stop when ‖b − Mθ‖ ≤ rtol·‖b‖", minimum=0.0),
    ),
    stats=OBJECTIVES["fisher"],
    stats_for=_stats_for,
))
