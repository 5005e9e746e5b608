"""Golden test 5 of methods.md: TIES against hand-worked examples for every compat mode, the global top-k pre-pass,
DARE's keep fraction / expectation / determinism, Breadcrumbs and DELLA masks."""
from __future__ import annotations

import math

import pytest
import torch

from unmerge.errors import MethodError
from unmerge.methods import TensorTask, get_method
from unmerge.methods.params import ParamPlan
from unmerge.methods.sparsify import breadcrumbs, dare, della, global_thresholds, tensor_seed, ties

D = torch.float64


def run(method: str, base, models, params=None, model_params=None, name="model.layers.0.mlp.weight", context=None):
    m = get_method(method)
    plan = ParamPlan.build(m, params or {}, model_params or [{} for _ in models])
    return m.fn(TensorTask(name, base, models, plan.for_tensor(name), context=context or {}))


# ---------------------------------------------------------------------------------------------------- TIES
# Three task vectors over 6 entries, base θ₀ = 1, weights w = (1, 2, 1), density 0.5 (k = 3; FusionBench keeps 4).
TAUS = [[4, 3, -1, 0.5, -2, 0.25],
        [2, -1, 5, 0.5, 3, -0.25],
        [6, 2, -3, -0.5, -4, 1.5]]
WEIGHTS = [1.0, 2.0, 1.0]
# Worked by hand (see the derivations in the test below):
EXPECTED = {
    "paper": [1 + 14 / 3, 4, 11, 1, 7, 1],
    "mergekit": [4.5, 4, 6, 1, 4, 1],
    "fusionbench": [15, 6, 11, 1, 7, 1],
    "peft": [1 + 14 / 3, 4, 11, 1, -2, 1],
}


@pytest.mark.parametrize("compat", sorted(EXPECTED))
def test_ties_hand_worked_three_models(compat):
    """Top-3 trim (k = 3): τ̂1 = [4, 3, 0, 0, −2, 0], τ̂2 = [2, 0, 5, 0, 3, 0], τ̂3 = [6, 0, −3, 0, −4, 0]
    (FusionBench keeps |τ| ≥ the 3rd smallest, i.e. 4 entries: τ̂1 + [., ., −1], τ̂2 + [., −1], τ̂3 + [., 2]).

    paper: w τ̂ sums [14, 3, 7, 0, 0, 0]; entry 4 (−2 + 6 − 4 = 0) takes sgn Σγ = +; disjoint means:
           [14/3, 3/1, 10/1, 0, 6/1, 0].
    mergekit: same signs (Σ ≥ 0 → +), divisor Σ w over agreeing: [14/4, 3/1, 10/2, 0, 6/2, 0].
    peft: elects on unweighted τ̂ sums [12, 3, 2, 0, −3, 0] → entry 4 is negative: (−2 − 4)/2 = −3.
    fusionbench: sums over agreeing w τ̂: [4+4+6, 3+2, 10, 0, 6, 0] (τ̂2's −1 at entry 1 disagrees).
    """
    base = torch.ones(6, dtype=D)
    models = [base + torch.tensor(t, dtype=D) for t in TAUS]
    got = run("ties", base, models, {"compat": compat, "density": 0.5}, [{"weight": w} for w in WEIGHTS])
    assert got.tolist() == pytest.approx(EXPECTED[compat], abs=1e-12)
    assert ties(base, models, WEIGHTS, [0.5] * 3, 1.0, compat).tolist() == pytest.approx(EXPECTED[compat], abs=1e-12)


@pytest.mark.parametrize("compat, expected", [
    ("paper", [-2.5, -1.0]),  # entry 1: Σ = 1 − 1 = 0 → sgn Σγ = sgn(−1) → the −1 survives
    ("fusionbench", [-5.0, -1.0]),  # same election, disjoint sum
    ("mergekit", [-2.5, 1.0]),  # Σ = 0 counts as + → the +1 survives
    ("peft", [-2.5, 1.0]),
])
def test_ties_zero_sum_tie_break(compat, expected):
    base = torch.zeros(2, dtype=D)
    models = [torch.tensor([-2.0, 1.0], dtype=D), torch.tensor([-3.0, -1.0], dtype=D)]
    assert run("ties", base, models, {"compat": compat, "density": 1.0}).tolist() == expected


def test_ties_lambda_and_normalize_override():
    base = torch.ones(6, dtype=D)
    models = [base + torch.tensor(t, dtype=D) for t in TAUS]
    params = [{"weight": w} for w in WEIGHTS]
    half = run("ties", base, models, {"density": 0.5, "lambda": 0.5}, params)
    assert (half - 1).tolist() == pytest.approx([(v - 1) / 2 for v in EXPECTED["paper"]], abs=1e-12)
    summed = run("ties", base, models, {"density": 0.5, "normalize": False}, params)
    assert summed.tolist() == pytest.approx([15, 4, 11, 1, 7, 1], abs=1e-12)
    assert run("ties", base, models, {"density": 0.5, "compat": "fusionbench", "normalize": True}, params).tolist() \
        == pytest.approx([1 + 14 / 3, 1 + 5 / 2, 11, 1, 7, 1], abs=1e-12)


def test_ties_keep_counts_per_compat():
    tau = torch.arange(1, 11, dtype=D)  # |τ| = 1..10, density 0.3
    base = torch.zeros(10, dtype=D)
    kept = {c: int((run("ties", base, [tau], {"compat": c, "density": 0.3}) != 0).sum()) for c in
            ("paper", "mergekit", "fusionbench", "peft")}
    assert kept == {"paper": 3, "mergekit": 3, "fusionbench": 4, "peft": 3}
    # ⌈0.25·10⌉ = 3 (paper keeps at least the density) but ⌊0.25·10⌋ = 2 (mergekit, peft)
    assert int((run("ties", base, [tau], {"density": 0.25}) != 0).sum()) == 3
    assert int((run("ties", base, [tau], {"density": 0.25, "compat": "peft"}) != 0).sum()) == 2


def _stream(base: dict, models: list[dict], density: list[float]):
    def factory():
        for name in base:
            yield TensorTask(name, base[name], [m[name] for m in models], {"density": density, "scope": "global"})
    return factory


def test_global_threshold_is_the_exact_kth_largest():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (50, 40), "b": (300,), "c": (7, 3, 5), "d": (1,)}
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    base["c"] = torch.zeros(shapes["c"])
    models = []
    for scale in (1e-3, 10.0):
        m = {n: base[n] + scale * torch.randn(s, generator=gen) * torch.rand(s, generator=gen)
             for n, s in shapes.items()}
        m["b"][:100] = base["b"][:100] + 0.5  # many exact magnitude ties
        m["c"] = 1e-39 * torch.rand(shapes["c"], generator=gen)  # subnormal task vectors
        models.append(m)
    density = [0.2, 0.035]
    got = global_thresholds(_stream(base, models, density))
    for i, m in enumerate(models):
        magnitudes = torch.cat([(m[n] - base[n]).abs().flatten() for n in shapes])
        k = math.ceil(density[i] * magnitudes.numel())
        assert got[i] == float(magnitudes.sort(descending=True).values[k - 1])
        assert int((magnitudes >= got[i]).sum()) >= k


def test_global_scope_without_prepass_is_an_error():
    base = torch.zeros(4)
    with pytest.raises(MethodError, match="pre-pass"):
        run("ties", base, [base + 1], {"scope": "global"})


def test_global_scope_applies_the_thresholds():
    base = torch.zeros(4, dtype=D)
    models = [torch.tensor([0.1, -0.5, 2.0, 0.2], dtype=D), torch.tensor([0.3, 0.3, -0.1, 0.0], dtype=D)]
    got = run("ties", base, models, {"scope": "global"}, context={"ties_thresholds": [0.5, 0.3]})
    assert got.tolist() == pytest.approx([0.3, -0.5, 2.0, 0.0])  # entry 1: −0.5 vs 0.3 → γ = −


# ---------------------------------------------------------------------------------------------------- DARE
def test_dare_keep_fraction_within_binomial_bound_and_rescale():
    n, p = 200_000, 0.9
    tau = 1.0 + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=D)
    out = dare(tau, p, seed=7)
    kept = out != 0
    assert abs(int(kept.sum()) - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p))
    torch.testing.assert_close(out[kept], tau[kept] / (1 - p))
    # E[Σ τ̃] = Σ τ, with Var = Σ τ² p/(1 − p)
    sd = math.sqrt(float((tau ** 2).sum()) * p / (1 - p))
    assert abs(float(out.sum() - tau.sum())) <= 5 * sd
    assert abs(float(dare(tau, p, seed=7, rescale=False).sum() - tau.sum())) > 5 * sd  # the rescale matters


def test_dare_same_seed_same_bytes_and_order_independent():
    tau = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    first = dare(tau, 0.5, seed=tensor_seed(3, "w", 0))
    again = dare(tau, 0.5, seed=tensor_seed(3, "w", 0))
    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert not torch.equal(first, dare(tau, 0.5, seed=tensor_seed(4, "w", 0)))
    base = torch.zeros(64, 32)
    models = [base + tau, base + tau]
    other_first = run("dare", base, models, {"drop_rate": 0.5, "seed": 3}, name="z")  # another tensor first
    a = run("dare", base, models, {"drop_rate": 0.5, "seed": 3}, name="w")
    b = run("dare", base, models, {"drop_rate": 0.5, "seed": 3}, name="w")
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, other_first)
    manual = (dare(tau, 0.5, tensor_seed(3, "w", 0)) + dare(tau, 0.5, tensor_seed(3, "w", 1)))
    torch.testing.assert_close(a, manual, rtol=0, atol=0)  # models get independent masks, summed (λ = w = 1)


def test_dare_density_alias_and_mergekit_l1_rescale():
    tau = torch.randn(10_000, generator=torch.Generator().manual_seed(2), dtype=D)
    base = torch.zeros_like(tau)
    out = run("dare", base, [tau], {"density": 0.3})
    assert abs(float((out != 0).double().mean()) - 0.3) < 0.03
    l1 = run("dare", base, [tau], {"density": 0.3, "compat": "mergekit"})
    assert float(l1.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-12)


def test_dare_ties_combines_with_sign_election():
    base = torch.zeros(3, dtype=D)
    models = [torch.tensor([1.0, -2.0, 3.0], dtype=D), torch.tensor([-3.0, -2.0, 1.0], dtype=D)]
    # drop_rate 0: no drop, so dare_ties is the TIES election with density 1 and dare_linear the plain sum
    assert run("dare_ties", base, models, {"drop_rate": 0.0}).tolist() == [-3.0, -2.0, 2.0]
    assert run("dare_linear", base, models, {"drop_rate": 0.0}).tolist() == [-2.0, -4.0, 4.0]


# ---------------------------------------------------------------------------------------------------- Breadcrumbs
def test_breadcrumbs_hand_worked():
    tau = torch.tensor([0.1, -5, 0.3, 2, -0.2, 1, 0.05, 4, -3, 0.5])
    # n = 10, density 0.6 → keep 6; gamma 0.1 → drop the largest (−5) and the 3 smallest (0.05, 0.1, −0.2)
    assert breadcrumbs(tau, 0.6, 0.1).tolist() == pytest.approx([0, 0, 0.3, 2, 0, 1, 0, 4, -3, 0.5])
    # density + gamma > 1: fewer top drops so that density remains
    assert torch.equal(breadcrumbs(tau, 0.95, 0.1), tau)
    base = torch.ones(10)
    got = run("breadcrumbs", base, [base + tau, base + 2 * tau], {"density": 0.6, "gamma": 0.1})
    torch.testing.assert_close(got, base + 3 * breadcrumbs(tau, 0.6, 0.1))


# ---------------------------------------------------------------------------------------------------- DELLA
def test_della_keep_probabilities_follow_magnitude_rank():
    rows = 20_000
    gen = torch.Generator().manual_seed(5)
    magnitudes = torch.stack([torch.randperm(5, generator=gen) + 1 for _ in range(rows)]).to(D)
    tau = magnitudes * torch.where(torch.rand(rows, 5, generator=gen) < 0.5, -1.0, 1.0).to(D)
    out = della(tau, density=0.5, epsilon=0.2, seed=11)
    kept = out != 0
    for rank, prob in enumerate([0.3, 0.4, 0.5, 0.6, 0.7]):
        at_rank = magnitudes == rank + 1
        freq = float(kept[at_rank].double().mean())
        assert abs(freq - prob) <= 5 * math.sqrt(prob * (1 - prob) / rows)
        torch.testing.assert_close(out[at_rank & kept], tau[at_rank & kept] / prob)
    with pytest.raises(MethodError, match="density"):
        della(tau, density=0.1, epsilon=0.15, seed=0)
