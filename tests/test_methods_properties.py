"""Golden test 6 of methods.md, for every registered method (new methods are picked up from the registry):
one model with weight 1 returns it, symmetric methods ignore the input order, zero task vectors are a no-op,
dtype and shape are preserved."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from unmerge.methods import Method, TensorTask, all_methods
from unmerge.methods.params import ParamPlan
from unmerge.methods.removal import REMOVAL_METHODS

# Parameters under which a method is the identity on one model (e.g. no sparsification); defaults otherwise.
IDENTITY_PARAMS: dict[str, dict[str, Any]] = {
    "ties": {"density": 1.0},
    "dare": {"drop_rate": 0.0},
    "dare_ties": {"drop_rate": 0.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.0},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.0},
    "della": {"density": 1.0, "epsilon": 0.0},
    "della_linear": {"density": 1.0, "epsilon": 0.0},
}
COUNTS = ("n", "n_base", "n_forget")  # counts N normally read from the statistics
PER_MODEL_VALUES = {"weight": [1.0, 2.0, 0.5], "alpha": [1.0, 0.5, 0.25]}  # distinct, to check they permute along
SHAPES = [(6, 5), (7,)]


def _positive(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    return (0.1 + torch.rand(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


STAT_FACTORIES = {
    "fisher": lambda n, shape, dtype: [_positive(shape, 100 + i, dtype) for i in range(n)],
    "base_fisher": lambda n, shape, dtype: [_positive(shape, 99, dtype)],
}


def _stats(method: Method, n: int, shape, dtype) -> dict[str, list[torch.Tensor]]:
    unknown = [kind for kind in method.stats if kind not in STAT_FACTORIES]
    if unknown:
        pytest.skip(f"no synthetic '{unknown[0]}' statistic for '{method.name}' (its own tests cover it)")
    return {kind: STAT_FACTORIES[kind](n, shape, dtype) for kind in method.stats}


def _run(method: Method, base, models, stats, params=None, model_params=None, name="model.layers.0.mlp.weight"):
    names = {p.name for p in method.params}
    params = {**{c: 3.0 for c in COUNTS if c in names}, **(params or {})}
    plan = ParamPlan.build(method, params, model_params or [{} for _ in models])
    return method.fn(TensorTask(name, base, models, plan.for_tensor(name), stats))


def _n_models(method: Method, want: int) -> int:
    n = max(want, method.min_models)
    return min(n, method.max_models) if method.max_models else n


def _tensor(shape, seed, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


METHODS = all_methods()
IDS = [m.name for m in METHODS]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_one_model_with_weight_one_returns_it(method, shape):
    if method.name in REMOVAL_METHODS:
        pytest.skip("a removal subtracts its model: there is no merge of one model to return")
    base = _tensor(shape, 0)
    model = base + _tensor(shape, 1, scale=0.1)
    n = _n_models(method, 1)  # methods taking two models get two copies
    got = _run(method, base, [model.clone() for _ in range(n)], _stats(method, n, shape, torch.float32),
               IDENTITY_PARAMS.get(method.name, {}))
    torch.testing.assert_close(got, model, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [m for m in METHODS if m.symmetric and (m.max_models or 3) >= 2],
                         ids=[m.name for m in METHODS if m.symmetric and (m.max_models or 3) >= 2])
def test_symmetric_methods_ignore_model_order(method):
    shape = (6, 5)
    base = _tensor(shape, 0)
    n = _n_models(method, 3)
    models = [base + _tensor(shape, 10 + i, scale=0.1) for i in range(n)]
    stats = _stats(method, n, shape, torch.float32)
    per_model = [{k: v[i] for k, v in PER_MODEL_VALUES.items() if k in {p.name for p in method.params}}
                 for i in range(n)]
    order = list(reversed(range(n)))
    permuted_stats = {k: v if k.startswith("base_") else [v[i] for i in order] for k, v in stats.items()}
    forward = _run(method, base, models, stats, model_params=per_model)
    backward = _run(method, base, [models[i] for i in order], permuted_stats,
                    model_params=[per_model[i] for i in order])
    torch.testing.assert_close(forward, backward, rtol=1e-5, atol=1e-6)
    assert (forward - base).abs().max() > 1e-4  # the merge moved something, so the check had teeth


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_zero_task_vectors_are_a_no_op(method):
    shape = (6, 5)
    base = _tensor(shape, 0)
    n = _n_models(method, 2)
    got = _run(method, base, [base.clone() for _ in range(n)], _stats(method, n, shape, torch.float32))
    torch.testing.assert_close(got, base, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_dtype_and_shape_are_preserved(method, dtype, shape):
    base = _tensor(shape, 0, dtype)
    n = _n_models(method, 2)
    models = [base + _tensor(shape, 20 + i, dtype, scale=0.05) for i in range(n)]
    got = _run(method, base, models, _stats(method, n, shape, dtype))
    assert got.dtype == dtype and got.shape == base.shape
    assert torch.isfinite(got).all()


PROPAGATING = [m for m in all_methods() if m.propagates_nonfinite]


def test_the_methods_that_skip_the_input_check_are_the_elementwise_affine_ones():
    assert sorted(m.name for m in PROPAGATING) == ["linear", "negation", "task_arithmetic"]


@pytest.mark.parametrize("method", PROPAGATING, ids=lambda m: m.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_input_reaches_the_output_of_a_propagating_method(method, bad):
    """The engine checks only the output of these methods: one NaN/Inf anywhere in any input, under a zero weight
    or λ = 0 too, must leave a non-finite output element (IEEE: 0·Inf = NaN, Inf − Inf = NaN)."""
    n = method.max_models or 3
    overrides = [{}, {"weight": [0.0] * n, "normalize": False}, {"lambda": 0.0}, {"normalize": True}]
    for params in overrides:
        params = {k: v for k, v in params.items() if any(p.name == k for p in method.params)}
        for which in range(n + (1 if method.needs_base else 0)):
            tensors = [torch.randn(6, 5, generator=torch.Generator().manual_seed(s)) for s in range(n + 1)]
            tensors[which][2, 3] = bad
            base, models = (tensors[0], tensors[1:]) if method.needs_base else (None, tensors[:n])
            plan = ParamPlan.build(method, params, [{} for _ in models])
            out = method.fn(TensorTask("w", base, models, plan.for_tensor("w")))
            assert not torch.isfinite(out).all(), (method.name, params, which)
