"""Gram (RegMean) and K-FAC estimators against independent computations on a tiny GPT-2 (Conv1D layers, tied head)
and a tiny Llama (nn.Linear layers, with and without bias, untied head); padding masked; ``unmerge stats``."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import assert_rel, linear_layer_io, make_gpt2
from unmerge.stats import Statistic
from unmerge.stats.gram import gram_statistics, layer_stat_names
from unmerge.stats.kfac import kfac_factors

EXAMPLES = [[1, 5, 9, 3, 7, 2], [4, 4, 8], [6, 1, 2, 3, 4, 5, 6, 7, 8], [9, 2], [3, 3, 3, 3, 1]]


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                      attention_bias=True, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


MODELS = {"gpt2": make_gpt2, "llama": make_llama}


def next_token_loglik(logits, ids, index):
    """Σ_pos log p(observed next token): the objective of the empirical K-FAC."""
    return torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:].unsqueeze(-1)).sum()


def reference(model, examples, labels: bool = False):
    """Per linear layer the stacked inputs X and, with ``labels``, the output gradients Γ (conftest)."""
    return linear_layer_io(model, examples, next_token_loglik if labels else None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_gram_equals_captured_inputs_whatever_the_padding(arch, batch_size):
    model = MODELS[arch]()
    grams, info = gram_statistics(model, EXAMPLES, batch_size=batch_size, progress=False)
    xs, _, modules = reference(model, EXAMPLES)
    n_tokens = sum(len(e) for e in EXAMPLES)
    assert info["n_tokens"] == n_tokens and info["n_examples"] == len(EXAMPLES)
    assert set(grams) == {f"{n}.gram" for n in modules}
    for name, x in xs.items():
        assert x.shape[0] == n_tokens
        assert_rel(grams[f"{name}.gram"], x.T @ x / n_tokens, what=name)
    layouts = {layer["type"]: layer["weight_layout"] for layer in info["layers"].values()}
    if arch == "gpt2":
        assert layouts == {"Conv1D": "in_out"} and len(modules) == 8
        assert info["skipped_layers"] == {"lm_head": "output embedding tied to the input embedding"}
    else:
        assert layouts == {"Linear": "out_in"} and "lm_head" in modules and len(modules) == 15
        assert info["layers"]["model.layers.0.self_attn.q_proj"]["bias"] is True
        assert info["layers"]["model.layers.0.mlp.up_proj"]["bias"] is False


def test_padding_does_not_change_the_gram():
    model = make_gpt2()
    short, long_ = EXAMPLES[1], EXAMPLES[2]
    alone, _ = gram_statistics(model, [short], batch_size=1, progress=False)
    other, _ = gram_statistics(model, [long_], batch_size=1, progress=False)
    pair, _ = gram_statistics(model, [short, long_], batch_size=2, progress=False)  # short gets 6 pad positions
    n_s, n_l = len(short), len(long_)
    for key in pair:
        assert_rel((pair[key] * (n_s + n_l) - other[key] * n_l) / n_s, alone[key], rtol=1e-4, what=key)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kfac_matches_independent_inputs_and_output_gradients(arch):
    model = MODELS[arch]()
    factors, info = kfac_factors(model, EXAMPLES, estimator="empirical", batch_size=3, progress=False)
    grams, _ = gram_statistics(model, EXAMPLES, batch_size=3, progress=False)
    xs, gs, modules = reference(model, EXAMPLES, labels=True)
    n = sum(len(e) for e in EXAMPLES)
    assert info["n_tokens"] == n and info["n_predicted_tokens"] == n - len(EXAMPLES)
    for name, module in modules.items():
        a, g = factors[f"{name}.A"], factors[f"{name}.G"]
        d = xs[name].shape[1]
        has_bias = module.bias is not None
        assert info["layers"][name]["homogeneous"] is has_bias
        assert a.shape == (d + has_bias, d + has_bias) and g.shape == (gs[name].shape[1],) * 2
        # A is the Gram, bordered by E[x] and 1 when the layer has a bias (homogeneous coordinate)
        assert_rel(a[:d, :d], grams[f"{name}.gram"], what=name)
        if has_bias:
            assert_rel(a[:d, d], xs[name].mean(0), what=name)
            assert_rel(a[d, :d], xs[name].mean(0), what=name)
            assert float(a[d, d]) == 1.0
        assert_rel(g, gs[name].T @ gs[name] / n, rtol=1e-4, what=name)
        assert float(g.abs().max()) > 0
    if arch == "gpt2":
        assert "lm_head.A" not in factors


def test_sampled_kfac_is_independent_of_batch_size_and_differs_from_empirical():
    model = make_gpt2()
    one, info = kfac_factors(model, EXAMPLES, estimator="sampled", batch_size=1, seed=4, progress=False)
    many, _ = kfac_factors(model, EXAMPLES, estimator="sampled", batch_size=5, seed=4, progress=False)
    empirical, _ = kfac_factors(model, EXAMPLES, estimator="empirical", batch_size=5, progress=False)
    assert info["estimator"] == "sampled" and info["seed"] == 4
    for key in one:
        assert_rel(many[key], one[key], rtol=1e-4, what=key)
    key = "transformer.h.1.mlp.c_proj.G"
    assert (one[key] - empirical[key]).abs().max() > 1e-3 * empirical[key].abs().max()


def test_layer_stat_names():
    assert layer_stat_names("fisher", "a.b.weight") == {"fisher": "a.b.weight"}
    assert layer_stat_names("gram", "a.b.weight") == {"gram": "a.b.gram"}
    assert layer_stat_names("kfac", "a.b.weight") == {"kfac.A": "a.b.A", "kfac.G": "a.b.G"}
    assert layer_stat_names("kfac", "a.b.bias") == {} and layer_stat_names("gram", "a.ln.bias") == {}


@pytest.fixture
def gpt2_dir(tmp_path):
    from unmerge.evaluation._testing import word_tokenizer

    path = tmp_path / "model"
    make_gpt2().save_pretrained(path)
    word_tokenizer(vocab_size=64).save_pretrained(path)
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat\nthe dog ran fast\nhello world\nred sun and blue sky\n")
    return path, data


def test_stats_command_writes_gram_kfac_and_fisher(gpt2_dir, tmp_path):
    from unmerge.stats.cli import stats_command

    model, data = gpt2_dir
    runner = CliRunner()
    for kind in ("gram", "kfac", "fisher"):
        extra = ["--estimator", "empirical"] if kind != "gram" else []
        result = runner.invoke(stats_command, [str(model), str(data), str(tmp_path / kind), "--kind", kind,
                                               "--batch-size", "3", "--quiet", "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        assert f"wrote {tmp_path / kind}: {kind}" in result.output
    gram, kfac, fisher = (Statistic(tmp_path / k) for k in ("gram", "kfac", "fisher"))
    assert (gram.kind, kfac.kind, fisher.kind) == ("gram", "kfac", "fisher")
    meta = json.loads((tmp_path / "kfac" / "statistic.json").read_text())
    assert meta["estimator"] == "empirical" and meta["n_examples"] == 4 and meta["N"] == 4.0
    assert meta["model_hash"] == gram.meta["model_hash"] == fisher.meta["model_hash"]
    assert meta["n_tokens"] == gram.meta["n_tokens"] == 4 * 2 + 6 + 4 + 2 + 5  # bos + words + eos
    assert sorted(gram.names()) == sorted(f"transformer.h.{i}.{m}.gram" for i in range(2)
                                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert gram.meta["layers"]["transformer.h.0.mlp.c_fc"]["weight_layout"] == "in_out"
    name = "transformer.h.1.attn.c_proj"
    assert_rel(kfac.get(f"{name}.A")[:16, :16], gram.get(f"{name}.gram"))
    assert "transformer.h.0.attn.c_attn.weight" in fisher
    # an option that does not apply to the kind is a usage error
    bad = runner.invoke(stats_command, [str(model), str(data), str(tmp_path / "x"), "--kind", "gram", "--seed", "1"])
    assert bad.exit_code == 2 and "--seed applies to --kind fisher or kfac" in bad.output
    # user mistakes print the message and a hint, exit 2
    missing = runner.invoke(stats_command, [str(model), str(tmp_path / "none.txt"), str(tmp_path / "y"), "--kind",
                                            "kfac", "--quiet"])
    assert missing.exit_code == 2 and "error:" in missing.output
