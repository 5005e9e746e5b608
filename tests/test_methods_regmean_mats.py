"""RegMean and MaTS: closed forms against independent computations, golden test 4 of methods.md (mats → fisher,
mats → regmean with a = 1, the K-FAC normal equations and the explicit Kronecker solve, null-space directions kept
at the initialization), and end-to-end merges of tiny fine-tuned GPT-2s and Llamas with estimated statistics."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_gpt2, perturbed
from unmerge.engine import merge_checkpoints, required_stats
from unmerge.errors import MethodError, RecipeError
from unmerge.methods import TensorTask, get_method
from unmerge.methods.fisher import fisher_merge
from unmerge.methods.mats import conjugate_gradient
from unmerge.methods.params import ParamPlan
from unmerge.methods.regmean import regmean_merge

D = torch.float64
LAYOUT = {0: "in_out", 1: "out_in"}  # input axis of the weight -> recorded layout (Conv1D, nn.Linear)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def data_gram(n, d, seed, rank=None):
    """G = XᵀX / n from a data matrix X [n, d] (of the given rank), float64."""
    x = torch.randn(n, rank or d, generator=gen(seed), dtype=D)
    if rank is not None:
        x = x @ torch.randn(rank, d, generator=gen(seed + 1), dtype=D)
    x = x * torch.linspace(0.5, 2.0, d, dtype=D)  # unequal scales: a non-trivial Gram
    return x, x.T @ x / n


def run(method_name, name, base, models, stats, params=None, layout=None):
    method = get_method(method_name)
    plan = ParamPlan.build(method, params or {}, [{} for _ in models])
    context = {"layer": {"weight_layout": layout}} if layout else {}
    task = TensorTask(name, base, models, plan.for_tensor(name), stats, context=context)
    return method.fn(task), task.record


# ------------------------------------------------------------------------------------------------------ regmean
@pytest.mark.parametrize("axis", [0, 1])
def test_regmean_a1_is_the_least_squares_fit_of_every_models_outputs(axis):
    """With a = 1 (and no ridge), W minimises Σ_i ‖X_i W − X_i W_i‖² / n_i: checked against lstsq on stacked data."""
    d_in, d_out = 5, 3
    data = [data_gram(n, d_in, 10 + i) for i, n in enumerate((7, 11))]
    ws = [torch.randn(d_in, d_out, generator=gen(20 + i), dtype=D) for i in range(2)]  # [in, out]
    stacked_x = torch.cat([x / len(x) ** 0.5 for x, _ in data])
    stacked_y = torch.cat([x @ w / len(x) ** 0.5 for (x, _), w in zip(data, ws)])
    want = torch.linalg.lstsq(stacked_x, stacked_y).solution
    models = [w if axis == 0 else w.T.contiguous() for w in ws]
    got = regmean_merge(models, [g for _, g in data], axis=axis, alpha=1.0, ridge=0.0)
    torch.testing.assert_close(got if axis == 0 else got.T, want, rtol=1e-10, atol=1e-10)


def test_regmean_shrinkage_alpha_0_is_a_per_input_weighted_average_and_alpha_interpolates():
    d_in, d_out = 4, 6
    grams = [data_gram(9, d_in, 30 + i)[1] for i in range(3)]
    ws = [torch.randn(d_in, d_out, generator=gen(40 + i), dtype=D) for i in range(3)]
    diag = torch.stack([g.diagonal() for g in grams])  # [models, in]
    want0 = (diag[:, :, None] * torch.stack(ws)).sum(0) / diag.sum(0)[:, None]
    torch.testing.assert_close(regmean_merge(ws, grams, axis=0, alpha=0.0, ridge=0.0), want0)
    shrunk = [0.1 * g + 0.9 * torch.diag(g.diagonal()) for g in grams]
    want = torch.linalg.solve(sum(shrunk), sum(s @ w for s, w in zip(shrunk, ws)))
    torch.testing.assert_close(regmean_merge(ws, grams, axis=0, alpha=0.1, ridge=0.0), want)
    # the default relative ridge barely moves a well-conditioned solve
    torch.testing.assert_close(regmean_merge(ws, grams, axis=0), want, rtol=1e-4, atol=1e-5)


def test_regmean_method_properties_and_records():
    d = 6  # a square weight: only the recorded layout tells the orientation
    grams = [data_gram(10, d, 50 + i)[1].float() for i in range(2)]
    w = torch.randn(d, d, generator=gen(1))
    # one model returns itself exactly (the ridge pulls toward the models' average), in both layouts
    for layout in ("in_out", "out_in"):
        got, record = run("regmean", "h.0.attn.c_proj.weight", None, [w.clone(), w.clone()], {"gram": grams},
                          layout=layout)
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
        assert record == {"rule": "regmean", "weight_layout": layout}
    ws = [w, w + torch.randn(d, d, generator=gen(2))]
    forward, _ = run("regmean", "x.weight", None, ws, {"gram": grams}, layout="out_in")
    backward, _ = run("regmean", "x.weight", None, ws[::-1], {"gram": grams[::-1]}, layout="out_in")
    torch.testing.assert_close(forward, backward)
    conv, _ = run("regmean", "x.weight", None, [m.T for m in ws], {"gram": grams}, layout="in_out")
    torch.testing.assert_close(forward, conv.T)  # the Linear layout is the transposed Conv1D one
    # without a layout a square weight is ambiguous; a non-square one is not
    with pytest.raises(MethodError, match="cannot tell the input axis"):
        run("regmean", "x.weight", None, ws, {"gram": grams})
    rect = [torch.randn(d, 3, generator=gen(3 + i)) for i in range(2)]
    got, record = run("regmean", "x.weight", None, rect, {"gram": grams})
    assert record["weight_layout"] == "in_out"
    # tensors without a Gram (biases, norms, embeddings) are averaged, and recorded so
    bias = [torch.randn(d, generator=gen(5 + i)) for i in range(2)]
    got, record = run("regmean", "h.0.attn.c_proj.bias", None, bias, {})
    torch.testing.assert_close(got, (bias[0] + bias[1]) / 2)
    assert record == {"rule": "average", "reason": "no Gram"}
    _, record = run("regmean", "transformer.wte.weight", None, rect, {"gram": grams})
    assert record == {"rule": "average", "reason": "embedding"}


def test_regmean_ridge_solves_singular_grams_toward_the_average():
    d = 5
    grams = [data_gram(2, d, 60 + i)[1] for i in range(2)]  # rank 2 each: Σ G has rank 4 < 5
    ws = [torch.randn(d, 2, generator=gen(70 + i), dtype=D) for i in range(2)]
    got = regmean_merge(ws, grams, axis=0, alpha=1.0, ridge=1e-9)
    null = torch.linalg.eigh(sum(grams)).eigenvectors[:, :1]  # the null direction of Σ G
    torch.testing.assert_close(null.T @ got, null.T @ (ws[0] + ws[1]) / 2, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- mats: golden test 4
def test_conjugate_gradient_solves_an_spd_system_and_reports():
    m = data_gram(20, 8, 80)[1]
    b = torch.randn(8, generator=gen(81), dtype=D)
    x, steps, residual = conjugate_gradient(lambda v: m @ v, b, torch.zeros(8, dtype=D), 100, 1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(m, b))
    assert 1 <= steps <= 20 and residual <= 1e-12
    x, steps, _ = conjugate_gradient(lambda v: m @ v, b, torch.zeros(8, dtype=D), 2, 1e-12)
    assert steps == 2


def test_mats_fisher_converges_to_fisher():
    shape = (7, 5)
    base = torch.randn(shape, generator=gen(0))
    models = [base + 0.1 * torch.randn(shape, generator=gen(1 + i)) for i in range(3)]
    fishers = [torch.rand(shape, generator=gen(10 + i)) ** 3 + 1e-3 for i in range(3)]  # spread over 3 decades
    got, record = run("mats", "h.0.mlp.c_fc.weight", base, models, {"fisher": fishers},
                      {"objective": "fisher", "rtol": 1e-10})
    want = fisher_merge([m.double() for m in models], [f.double() for f in fishers], [1.0] * 3, epsilon=1e-30)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert record["rule"] == "cg" and 0 < record["iterations"] <= 100 and record["residual"] <= 1e-10
    # 1-D tensors (biases, norms) have a Fisher too and are solved; embeddings keep the initialization
    bias, _ = run("mats", "h.0.ln_1.bias", base[0], [m[0] for m in models], {"fisher": [f[0] for f in fishers]},
                  {"rtol": 1e-10})
    torch.testing.assert_close(bias.double(), want[0], rtol=1e-6, atol=1e-6)
    emb, record = run("mats", "transformer.wpe.weight", base, models, {"fisher": fishers})
    torch.testing.assert_close(emb, base + 0.3 * sum(m - base for m in models))
    assert record["rule"] == "init" and record["reason"] == "embedding"


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", [(6, 4), (5, 5)])
def test_mats_regmean_converges_to_regmean_with_plain_grams(axis, shape):
    d_in = shape[axis]
    grams = [data_gram(12, d_in, 90 + i)[1].float() for i in range(2)]
    base = torch.randn(shape, generator=gen(0))
    models = [base + torch.randn(shape, generator=gen(1 + i)) for i in range(2)]
    got, record = run("mats", "h.0.attn.c_attn.weight", base, models, {"gram": grams},
                      {"objective": "regmean", "rtol": 1e-12}, layout=LAYOUT[axis])
    want = regmean_merge([m.double() for m in models], [g.double() for g in grams], axis=axis, alpha=1.0, ridge=0.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert record["rule"] == "cg" and record["weight_layout"] == LAYOUT[axis] and record["residual"] <= 1e-12


def _kfac_stats(d_in, d_out, n_models, bias, rank_a=None, seed=100):
    """Model-specific A (over [x, 1] when ``bias``) and G factors from data, float32 as stored."""
    a_factors, g_factors = [], []
    for i in range(n_models):
        x, _ = data_gram(15, d_in, seed + 10 * i, rank_a)
        if bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)
        grads = torch.randn(15, d_out, generator=gen(seed + 10 * i + 5), dtype=D)
        a_factors.append((x.T @ x / len(x)).float())
        g_factors.append((grads.T @ grads / len(grads)).float())
    return a_factors, g_factors


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_mats_kfac_satisfies_the_normal_equations_and_equals_the_kronecker_solve(axis, bias):
    d_in, d_out = 4, 3
    shape = (d_in, d_out) if axis == 0 else (d_out, d_in)
    a_factors, g_factors = _kfac_stats(d_in, d_out, 3, bias)
    base = torch.randn(shape, generator=gen(0))
    models = [base + torch.randn(shape, generator=gen(1 + i)) for i in range(3)]
    got, record = run("mats", "h.0.mlp.c_fc.weight", base, models, {"kfac.A": a_factors, "kfac.G": g_factors},
                      {"objective": "kfac", "rtol": 1e-12}, layout=LAYOUT[axis])
    a = [f.double()[:d_in, :d_in] for f in a_factors]  # the weight's block of A
    g = [f.double() for f in g_factors]
    x, ws = got.double(), [m.double() for m in models]
    if axis == 0:  # Conv1D [in, out]: Σ A X G = Σ A W G, and (A ⊗ G) vec(X) with row-major vec
        lhs, rhs = sum(ai @ x @ gi for ai, gi in zip(a, g)), sum(ai @ w @ gi for ai, gi, w in zip(a, g, ws))
        kron = sum(torch.kron(ai, gi) for ai, gi in zip(a, g))
        vec_b = sum(torch.kron(ai, gi) @ w.flatten() for ai, gi, w in zip(a, g, ws))
    else:  # nn.Linear [out, in]: Σ G X A = Σ G W A, i.e. (G ⊗ A) vec(X)
        lhs, rhs = sum(gi @ x @ ai for ai, gi in zip(a, g)), sum(gi @ w @ ai for ai, gi, w in zip(a, g, ws))
        kron = sum(torch.kron(gi, ai) for ai, gi in zip(a, g))
        vec_b = sum(torch.kron(gi, ai) @ w.flatten() for ai, gi, w in zip(a, g, ws))
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-6
    explicit = torch.linalg.solve(kron, vec_b).reshape(shape)
    torch.testing.assert_close(x, explicit, rtol=1e-5, atol=1e-5)
    assert record["rule"] == "cg" and record["residual"] <= 1e-12
    assert record.get("bias_coordinate") == ("dropped" if bias else None)
    # the bias of a layer is not a linear-layer weight: it keeps the initialization
    init = base[0] + 0.3 * sum(m[0] - base[0] for m in models)
    b, record = run("mats", "h.0.mlp.c_fc.bias", base[0], [m[0] for m in models], {}, {"objective": "kfac"})
    torch.testing.assert_close(b, init)
    assert record["rule"] == "init" and "not a linear-layer weight" in record["reason"]


def _null_projector(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    null = vecs[:, vals < 1e-10 * vals.max()]
    assert null.shape[1] > 0
    return null @ null.T


@pytest.mark.parametrize("objective", ["regmean", "kfac"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("subspace", ["rotated", "dead-inputs"])
def test_null_space_directions_stay_at_the_initialization(objective, axis, subspace):
    d_in, d_out = 6, 4
    shape = (d_in, d_out) if axis == 0 else (d_out, d_in)
    # every model's inputs span the same 3-dimensional subspace of the 6 inputs: Σ G has a 3-dim null space; either
    # a rotated one (float64 factors: float32 rounding would lift the null space to ~1e-8) or 3 inputs that are
    # always zero (exact even in the float32 the statistics are stored in)
    if subspace == "rotated":
        basis, dtype = torch.randn(3, d_in, generator=gen(7), dtype=D), D
    else:
        basis, dtype = torch.eye(d_in, dtype=D)[:3], torch.float32
    xs = [torch.randn(10, 3, generator=gen(200 + i), dtype=D) @ basis for i in range(2)]
    grams = [(x.T @ x / len(x)).to(dtype) for x in xs]
    g_factors = [(torch.eye(d_out, dtype=D) * (1 + i)).to(dtype) for i in range(2)]
    stats = {"gram": grams} if objective == "regmean" else {"kfac.A": grams, "kfac.G": g_factors}
    base = torch.randn(shape, generator=gen(0))
    models = [base + torch.randn(shape, generator=gen(1 + i)) for i in range(2)]
    got, record = run("mats", "h.0.attn.c_attn.weight", base, models, stats, {"objective": objective, "rtol": 1e-12},
                      layout=LAYOUT[axis])
    init = base + 0.3 * sum(m - base for m in models)
    project = _null_projector(sum(g.double() for g in grams))
    moved = (got - init).double()
    moved = moved if axis == 0 else moved.T  # [in, out]
    assert float((project @ moved).abs().max()) < 1e-5  # null directions: still at the initialization
    assert float(moved.abs().max()) > 1e-2  # the range directions did move
    assert record["residual"] <= 1e-6


def test_fisher_null_space_entries_stay_at_the_initialization():
    shape = (4, 5)
    base = torch.randn(shape, generator=gen(0))
    models = [base + torch.randn(shape, generator=gen(1 + i)) for i in range(2)]
    zero = torch.rand(shape, generator=gen(9)) < 0.3
    fishers = [torch.where(zero, 0.0, torch.rand(shape, generator=gen(10 + i)) + 0.1) for i in range(2)]
    for init in ("task_arithmetic", "average", "base"):
        got, _ = run("mats", "x.weight", base, models, {"fisher": fishers}, {"init": init, "rtol": 1e-12})
        start, _ = run("mats", "x.weight", base, models, {"fisher": fishers}, {"init": init, "iterations": 0})
        torch.testing.assert_close(got[zero], start[zero], rtol=0, atol=1e-6)
        want = fisher_merge(models, fishers, [1.0, 1.0], epsilon=1e-30)
        torch.testing.assert_close(got[~zero], want[~zero], rtol=1e-5, atol=1e-6)


def test_mats_initializations_and_parameters():
    shape = (3, 4)
    base = torch.randn(shape, generator=gen(0))
    models = [base + torch.randn(shape, generator=gen(1 + i)) for i in range(2)]
    fishers = [torch.rand(shape, generator=gen(5 + i)) + 0.1 for i in range(2)]
    expected = {"task_arithmetic": base + 0.3 * (models[0] + models[1] - 2 * base),
                "average": (models[0] + models[1]) / 2, "base": base}
    for init, want in expected.items():
        got, record = run("mats", "x.weight", base, models, {"fisher": fishers}, {"init": init, "iterations": 0})
        torch.testing.assert_close(got, want)
        assert record["iterations"] == 0 and record["init"] == init and record["residual"] > 0
    got, _ = run("mats", "x.weight", base, models, {"fisher": fishers}, {"lambda": 1.0, "iterations": 0})
    torch.testing.assert_close(got, base + (models[0] + models[1] - 2 * base))
    mats = get_method("mats")
    assert required_stats(mats, {}) == ("fisher",)
    assert required_stats(mats, {"objective": "regmean"}) == ("gram",)
    assert required_stats(mats, {"objective": "kfac"}) == ("kfac",)
    with pytest.raises(MethodError, match="did you mean 'kfac'"):
        required_stats(mats, {"objective": "kfca"})


# ------------------------------------------------------------------------------------------------- end to end
def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                      attention_bias=True, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per architecture: base + two fine-tunes (with tokenizers) and each fine-tune's gram, kfac and fisher."""
    from unmerge.evaluation._testing import word_tokenizer
    from unmerge.stats.compute import estimate_statistic

    root = tmp_path_factory.mktemp("regmean-mats")
    texts = ["the cat sat on the mat", "the dog ran fast on the road", "hello world", "red sun and blue sky",
             "one two three four five", "paris is the capital of france"]
    out = {}
    for arch, make in (("gpt2", make_gpt2), ("llama", _llama)):
        base = make()
        dirs = [root / arch / name for name in ("base", "ft1", "ft2")]
        for model, path in zip([base, perturbed(base, 1, 0.05), perturbed(base, 2, 0.05)], dirs):
            model.save_pretrained(path)
            word_tokenizer(vocab_size=64).save_pretrained(path)
        stats = {}
        for kind in (("gram", "kfac", "fisher") if arch == "gpt2" else ("gram", "kfac")):
            stats[kind] = []
            for i, path in enumerate(dirs[1:]):  # each model on its own data
                stats[kind].append(root / arch / f"{kind}{i}")
                estimate_statistic(kind, path, texts[3 * i: 3 * i + 3], stats[kind][-1], batch_size=2,
                                   device="cpu", progress=False)
        out[arch] = (dirs, stats)
    return out


def _config(dirs, stats, method, kind, params):
    return {"merge_method": method, "base_model": str(dirs[0]), "parameters": params,
            "models": [{"model": str(d), kind: str(s)} for d, s in zip(dirs[1:], stats[kind])]}


def _load(path):
    return {k: v.double() for k, v in load_file(path / "model.safetensors").items()}


def _stat(path, name):
    return load_file(path / "statistic.safetensors")[name].double()


def _kfac_residuals(paths, module, merged, init, models, axis):
    """‖Σ C_i(θ_i) − Σ C_i(X)‖ / ‖Σ C_i(θ_i)‖ for X = merged and X = init, C_i(X) = A_i X G_i (Conv1D, axis 0) or
    G_i X A_i (nn.Linear, axis 1), A_i restricted to the weight's inputs."""
    n_in = models[0].shape[axis]
    a = [_stat(p, f"{module}.A")[:n_in, :n_in] for p in paths]
    g = [_stat(p, f"{module}.G") for p in paths]
    apply = (lambda ai, gi, x: ai @ x @ gi) if axis == 0 else (lambda ai, gi, x: gi @ x @ ai)
    b = sum(apply(ai, gi, w) for ai, gi, w in zip(a, g, models))
    return tuple(float((b - sum(apply(ai, gi, x) for ai, gi in zip(a, g))).norm() / b.norm()) for x in (merged, init))


CASES = [("regmean", "gram", {}), ("mats", "fisher", {"objective": "fisher"}),
         ("mats", "gram", {"objective": "regmean"}), ("mats", "kfac", {"objective": "kfac"})]


@pytest.mark.parametrize("method,kind,params", CASES, ids=["regmean", "mats-fisher", "mats-regmean", "mats-kfac"])
def test_gpt2_merge_config_end_to_end(zoo, tmp_path, method, kind, params):
    from transformers import AutoModelForCausalLM

    from unmerge.merge_config import merge

    dirs, stats = zoo["gpt2"]
    out = tmp_path / "merged"
    if method == "mats":  # K-FAC products are the slow ones on a busy CPU: fewer CG steps there
        params = {**params, "rtol": 1e-9, "iterations": 30 if kind == "kfac" else 100}
    merge(_config(dirs, stats, method, kind, params), out, device="cpu", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert ids.shape == (1, 6)
    merged, base, fts = _load(out), _load(dirs[0]), [_load(d) for d in dirs[1:]]
    info = json.loads((out / "merge_info.json").read_text())
    records = info["per_tensor"]
    assert "lm_head.weight" not in merged and "lm_head.weight" not in records  # tied: merged once, as wte
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D [16, 48]
    if method == "regmean":
        grams = [_stat(s, "transformer.h.0.attn.c_attn.gram") for s in stats["gram"]]
        shrunk = [0.1 * g + 0.9 * torch.diag(g.diagonal()) for g in grams]
        want = torch.linalg.solve(sum(shrunk), sum(s @ ft[name] for s, ft in zip(shrunk, fts)))
        torch.testing.assert_close(merged[name], want, rtol=1e-4, atol=1e-5)
        for other in ("transformer.h.0.attn.c_attn.bias", "transformer.wte.weight", "transformer.ln_f.weight"):
            torch.testing.assert_close(merged[other], (fts[0][other] + fts[1][other]) / 2, rtol=1e-5, atol=1e-6)
        assert records[name]["rule"] == "regmean" and records["transformer.ln_f.weight"]["rule"] == "average"
        return
    init = {n: base[n] + 0.3 * (fts[0][n] + fts[1][n] - 2 * base[n]) for n in base}
    for emb in ("transformer.wte.weight", "transformer.wpe.weight"):
        torch.testing.assert_close(merged[emb], init[emb], rtol=1e-5, atol=1e-6)
        assert records[emb]["rule"] == "init" and records[emb]["reason"] == "embedding"
    solved = [n for n, r in records.items() if r.get("rule") == "cg"]
    limit = params["iterations"]
    assert name in solved and all(0 <= records[n]["iterations"] <= limit for n in solved)
    assert all(records[n]["residual"] <= 1e-9 or records[n]["iterations"] == limit for n in solved)
    if params["objective"] == "fisher":
        assert "transformer.h.0.ln_1.weight" in solved  # the diagonal objective covers every non-embedding tensor
        converged = [n for n in solved if records[n]["iterations"] < 100]
        assert len(converged) > 10
        for n in converged:  # where CG converged, the result is Fisher merging, except where Σ F = 0 (init)
            f = [_stat(s, n) for s in stats["fisher"]]
            total = f[0] + f[1]
            seen = total > 1e-3 * total.max()  # small-curvature entries converge last
            want = (f[0] * fts[0][n] + f[1] * fts[1][n]) / total
            torch.testing.assert_close(merged[n][seen], want[seen], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(merged[n][total == 0], init[n][total == 0], rtol=1e-5, atol=1e-6)
        # c_attn's Fisher spans many decades: 100 plain CG steps stop short, at the residual they record
        f = [_stat(s, name) for s in stats["fisher"]]
        b = f[0] * fts[0][name] + f[1] * fts[1][name]
        residual = float((b - (f[0] + f[1]) * merged[name]).norm() / b.norm())
        initial = float((b - (f[0] + f[1]) * init[name]).norm() / b.norm())
        assert residual == pytest.approx(records[name]["residual"], rel=1e-2) and residual < 1e-2 * initial
        want = None
    elif params["objective"] == "regmean":
        g = [_stat(s, "transformer.h.0.attn.c_attn.gram") for s in stats["gram"]]
        want = torch.linalg.solve(g[0] + g[1], g[0] @ fts[0][name] + g[1] @ fts[1][name])
    else:  # K-FAC of a random tiny model is ill-conditioned: CG steps reduce, and record, the residual
        residual, initial = _kfac_residuals(stats["kfac"], "transformer.h.0.attn.c_attn", merged[name], init[name],
                                            [ft[name] for ft in fts], axis=0)
        assert residual == pytest.approx(records[name]["residual"], rel=1e-2) and residual < 0.1 * initial
        assert records[name]["bias_coordinate"] == "dropped"
        want = None
    if want is not None:
        scale = want.abs().max()
        assert float((merged[name] - want).abs().max() / scale) < 1e-4
    if params["objective"] != "fisher":
        bias = "transformer.h.0.attn.c_attn.bias"
        torch.testing.assert_close(merged[bias], init[bias], rtol=1e-5, atol=1e-6)
        assert records[bias]["rule"] == "init"


def test_llama_linear_layers_through_the_engine(zoo, tmp_path):
    """nn.Linear weights ([out, in]; q/o projections are square) merged through the engine in their own layout."""
    from transformers import AutoModelForCausalLM

    from unmerge.checkpoint import Checkpoint
    from unmerge.stats import Statistic

    dirs, stats = zoo["llama"]
    base, models = Checkpoint(dirs[0]), [Checkpoint(d) for d in dirs[1:]]
    fts = [_load(d) for d in dirs[1:]]
    merge_checkpoints("regmean", base, models, tmp_path / "rm", params={"alpha": 1.0, "ridge": 0.0},
                      stats={"gram": [Statistic(s) for s in stats["gram"]]}, device="cpu", progress=False)
    merge_checkpoints("mats", base, models, tmp_path / "kfac", params={"objective": "kfac", "iterations": 30},
                      stats={"kfac": [Statistic(s) for s in stats["kfac"]]}, device="cpu", progress=False)
    rm, kf = _load(tmp_path / "rm"), _load(tmp_path / "kfac")
    base_state = _load(dirs[0])
    records = json.loads((tmp_path / "kfac" / "merge_info.json").read_text())["per_tensor"]
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "lm_head"):
        name = f"{module}.weight"
        g = [_stat(s, f"{module}.gram") for s in stats["gram"]]
        # nn.Linear: W = (Σ W_i G_i)(Σ G_i)⁻¹
        want = torch.linalg.solve(g[0] + g[1], g[0] @ fts[0][name].T + g[1] @ fts[1][name].T).T
        torch.testing.assert_close(rm[name], want, rtol=1e-4, atol=1e-5)
        # the recorded residual is that of X ↦ Σ G_i X A_i (the Linear layout), and CG reduced it
        init = base_state[name] + 0.3 * (fts[0][name] + fts[1][name] - 2 * base_state[name])
        residual, initial = _kfac_residuals(stats["kfac"], module, kf[name], init, [ft[name] for ft in fts], axis=1)
        assert residual == pytest.approx(records[name]["residual"], rel=1e-2) and residual < 0.1 * initial, name
    info = records
    assert info["model.layers.0.self_attn.q_proj.weight"]["weight_layout"] == "out_in"
    assert info["model.embed_tokens.weight"]["rule"] == "init"
    assert info["model.layers.0.input_layernorm.weight"]["rule"] == "init"
    AutoModelForCausalLM.from_pretrained(tmp_path / "kfac")


def test_config_errors_name_the_missing_statistic(zoo, tmp_path):
    from unmerge.merge_config import parse_config

    dirs, stats = zoo["gpt2"]
    config = _config(dirs, stats, "mats", "gram", {"objective": "kfac"})
    config["models"] = [{"model": str(d)} for d in dirs[1:]]
    with pytest.raises(RecipeError, match="needs a 'kfac' statistic") as err:
        parse_config(config)
    assert "unmerge stats MODEL DATA OUT --kind kfac" in err.value.hint
    with pytest.raises(RecipeError, match="does not use 'gram'"):
        parse_config(_config(dirs, stats, "mats", "gram", {"objective": "fisher"}) | {
            "models": [{"model": str(d), "gram": str(s), "fisher": str(f)}
                       for d, s, f in zip(dirs[1:], stats["gram"], stats["fisher"])]})
    # a Gram given where K-FAC factors are expected is refused, naming the kinds
    from unmerge.checkpoint import Checkpoint
    from unmerge.errors import StatisticError
    from unmerge.stats import Statistic

    with pytest.raises(StatisticError, match="is a 'gram' statistic, given as 'kfac'"):
        merge_checkpoints("mats", Checkpoint(dirs[0]), [Checkpoint(d) for d in dirs[1:]], tmp_path / "x",
                          params={"objective": "kfac"}, stats={"kfac": [Statistic(s) for s in stats["gram"]]},
                          device="cpu", progress=False)
