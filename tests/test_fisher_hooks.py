"""The hooks Fisher path (one batched backward, per-example squares layer by layer) equals the batch-1 loop; it
falls back where it does not apply; sequence classifiers get log p(y | x) Fishers through the same entry point."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import make_gpt2
from unmerge.errors import StatisticError
from unmerge.stats.fisher import diagonal_fisher, draw_labels, model_kind

EXAMPLES = [[1, 5, 9, 3, 7, 2], [4, 4, 8], [6, 1, 2, 3, 4, 5, 6, 7, 8], [9, 2], [3, 3, 3, 3, 1]]
CLASSES = [0, 2, 1, 1, 0]


def make_llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2_classifier(seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0,
                     bos_token_id=0, eos_token_id=0)
    return GPT2ForSequenceClassification(cfg).eval()


def make_bert_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=3, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"gpt2": make_gpt2, "llama-tied": lambda: make_llama(True), "llama-untied": lambda: make_llama(False)}


def assert_close(a, b, rtol=1e-5, floor=0.0):
    """max |a - b| ≤ rtol · max |b| per tensor; ``floor``: fraction of the largest entry of all tensors below which a
    tensor's own scale is not used (parameters whose gradient vanishes identically hold only rounding noise)."""
    overall = max(float(v.abs().max()) for v in b.values())
    assert set(a) == set(b)
    for name in b:
        scale = max(float(b[name].abs().max()), floor * overall, 1e-30)
        assert float((a[name] - b[name]).abs().max()) / scale < rtol, name


def causal_reference(model, examples, level):
    """Independent: one example (or position) at a time, observed next tokens, plain backward, square, mean."""
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for ex in examples:
        logp = torch.log_softmax(model(input_ids=torch.tensor([ex])).logits[0, :-1], -1)
        picked = logp.gather(-1, torch.tensor(ex[1:]).unsqueeze(-1)).squeeze(-1)
        for target in ([picked.sum()] if level == "sequence" else list(picked)):
            model.zero_grad()
            target.backward(retain_graph=True)
            for n, p in model.named_parameters():
                sums[n] += p.grad**2
            count += 1
    return {n: s / count for n, s in sums.items()}


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_hooks_empirical_equals_an_independent_batch1_loop(arch, level, batch_size):
    model = MODELS[arch]()
    fisher, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", level=level, batch_size=batch_size,
                                   path="hooks", progress=False)
    assert info["path"] == "hooks" and info["model_kind"] == "causal_lm"
    assert info["n_examples"] == (len(EXAMPLES) if level == "sequence" else sum(len(e) - 1 for e in EXAMPLES))
    assert_close(fisher, causal_reference(model, EXAMPLES, level))


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_hooks_sampled_equals_the_loop(arch, level):
    model = MODELS[arch]()
    fast, _ = diagonal_fisher(model, EXAMPLES, level=level, batch_size=3, seed=5, path="hooks", progress=False)
    slow, _ = diagonal_fisher(model, EXAMPLES, level=level, batch_size=1, seed=5, path="loop", progress=False)
    empirical, _ = diagonal_fisher(model, EXAMPLES, estimator="empirical", level=level, path="hooks", progress=False)
    assert_close(fast, slow)
    name = next(iter(slow))
    assert (fast[name] - empirical[name]).abs().max() > 1e-3 * empirical[name].abs().max()


def test_tied_parameter_sums_both_uses_before_squaring():
    """lm_head.weight is wte.weight: per example (embedding rows + output layer) is squared, not each part."""
    model = make_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    fisher, _ = diagonal_fisher(model, EXAMPLES[:2], estimator="empirical", batch_size=2, path="hooks",
                                progress=False)
    ex = EXAMPLES[0]
    model.zero_grad()
    logp = torch.log_softmax(model(input_ids=torch.tensor([ex])).logits[0, :-1], -1)
    logp.gather(-1, torch.tensor(ex[1:]).unsqueeze(-1)).sum().backward()
    both = model.transformer.wte.weight.grad.clone()
    rows = torch.tensor(ex)
    assert both[rows].abs().sum() > 0 and "lm_head.weight" not in fisher
    ref = causal_reference(model, EXAMPLES[:2], "sequence")["transformer.wte.weight"]
    assert_close({"w": fisher["transformer.wte.weight"]}, {"w": ref})


class Scale(nn.Module):
    """A module type the hooks path does not know: y = s · x with a trainable scalar s."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return self.s * x


def test_unsupported_module_falls_back_with_the_same_numbers():
    model = make_gpt2()
    model.transformer.ln_f = nn.Sequential(model.transformer.ln_f, Scale())
    fisher, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=3, progress=False)
    assert info["path"] == "vmap" and "transformer.ln_f.1.s" in info["fallback"]
    assert_close(fisher, causal_reference(model, EXAMPLES, "sequence"))
    with pytest.raises(StatisticError, match="hooks Fisher path does not apply"):
        diagonal_fisher(model, EXAMPLES, estimator="empirical", path="hooks", progress=False)


def test_parameter_used_outside_its_module_is_caught_by_the_batch_gradient_check():
    """A hook re-uses layer 0's attention c_proj weight on layer 1's MLP output: the per-row sums miss that use,
    so the path must refuse."""
    model = make_gpt2()
    attn = model.transformer.h[0].attn.c_proj  # looked up at call time, so vmap's functional_call swaps it too
    model.transformer.h[1].mlp.c_proj.register_forward_hook(lambda m, i, out: out + 0.5 * out @ attn.weight)
    fisher, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=3, progress=False)
    assert info["path"] == "vmap" and "do not add up" in info["fallback"]
    assert_close(fisher, causal_reference(model, EXAMPLES, "sequence"))


class OffsetRMSNorm(nn.Module):
    """Gemma-style y = (1 + w) ⊙ x̂: named like an RMSNorm but not the Llama formula; the norm check rejects it."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(norm.weight.detach().clone() - 1), norm.variance_epsilon

    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_a_norm_that_is_not_the_assumed_formula_falls_back():
    model = make_llama(tied=False)
    model.model.norm = OffsetRMSNorm(model.model.norm)
    fisher, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=3, progress=False)
    assert info["path"] == "vmap" and "not the norm recomputed" in info["fallback"]
    assert_close(fisher, causal_reference(model, EXAMPLES, "sequence"))


def test_draw_labels_follows_the_distribution_and_is_batch_independent():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.clamp_min(1e-30).log().expand(1, 40000, 4)
    draws = draw_labels(logits, [7])[0]
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert freq[1] == 0 and (freq - probs.double()).abs().max() < 0.01  # 4σ ≈ 0.01 at n = 40000
    batch = torch.randn(3, 5, 4)
    assert torch.equal(draw_labels(batch, [1, 2, 3])[1], draw_labels(batch[1:2], [2])[0])


def classifier_reference(model, examples, labels):
    """Independent: one example at a time, log p(y | x) from the pooled logits, plain backward, square, mean."""
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ex, y in zip(examples, labels):
        model.zero_grad()
        torch.log_softmax(model(input_ids=torch.tensor([ex])).logits[0], -1)[y].backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad**2
    return {n: s / len(examples) for n, s in sums.items()}


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("make", [make_gpt2_classifier, make_bert_classifier])
def test_classifier_fisher_equals_an_independent_loop(make, batch_size):
    model = make()
    assert model_kind(model) == "sequence_classification"
    fisher, info = diagonal_fisher(model, EXAMPLES, labels=CLASSES, estimator="empirical", batch_size=batch_size,
                                   progress=False)
    assert info["path"] == "hooks" and info["model_kind"] == "sequence_classification" and info["n_examples"] == 5
    # BERT's attention key biases have an identically zero gradient (softmax shift): only rounding noise there
    assert_close(fisher, classifier_reference(model, EXAMPLES, CLASSES), floor=1e-12)
    loop, _ = diagonal_fisher(model, EXAMPLES, labels=CLASSES, estimator="empirical", path="loop", progress=False)
    assert_close(fisher, loop, floor=1e-12)


def test_classifier_sampled_fisher_draws_labels_from_the_model():
    model = make_gpt2_classifier()
    fast, _ = diagonal_fisher(model, EXAMPLES, batch_size=3, seed=2, path="hooks", progress=False)
    slow, _ = diagonal_fisher(model, EXAMPLES, batch_size=1, seed=2, path="loop", progress=False)
    assert_close(fast, slow)
    # the same draws by hand: one per example from softmax of its pooled logits, generator seeded per example
    with torch.no_grad():
        drawn = [int(draw_labels(model(input_ids=torch.tensor([ex])).logits[:, None], [2 * 1_000_003 + i])[0, 0])
                 for i, ex in enumerate(EXAMPLES)]
    assert_close(fast, classifier_reference(model, EXAMPLES, drawn), rtol=1e-4)


def test_classifier_padding_pools_the_last_real_token():
    """Batched with longer examples (right padding with pad_token_id), an example's contribution is unchanged."""
    model = make_gpt2_classifier()
    alone, _ = diagonal_fisher(model, [EXAMPLES[1]], labels=[2], estimator="empirical", progress=False)
    pair, _ = diagonal_fisher(model, [EXAMPLES[1], EXAMPLES[2]], labels=[2, 1], estimator="empirical",
                              batch_size=2, progress=False)
    other, _ = diagonal_fisher(model, [EXAMPLES[2]], labels=[1], estimator="empirical", progress=False)
    assert_close({n: 2 * pair[n] - other[n] for n in pair}, alone, rtol=1e-4)


def test_classifier_fisher_errors_name_the_fix():
    model = make_gpt2_classifier()
    with pytest.raises(StatisticError, match="needs the observed labels"):
        diagonal_fisher(model, EXAMPLES, estimator="empirical", progress=False)
    with pytest.raises(StatisticError, match="level 'token' does not apply"):
        diagonal_fisher(model, EXAMPLES, level="token", progress=False)
    with pytest.raises(StatisticError, match="label 3 of example 1 is not a class"):
        diagonal_fisher(model, EXAMPLES, labels=[0, 3, 0, 0, 0], estimator="empirical", progress=False)
    with pytest.raises(StatisticError, match="5 labels for 2 examples"):
        diagonal_fisher(model, EXAMPLES[:2], labels=CLASSES, estimator="empirical", progress=False)
    with pytest.raises(StatisticError, match="causal LMs only"):
        diagonal_fisher(model, EXAMPLES, path="vmap", progress=False)
    with pytest.raises(StatisticError, match="sequence-classification models only"):
        diagonal_fisher(make_gpt2(), EXAMPLES, labels=CLASSES, progress=False)
    model.config.pad_token_id = None
    with pytest.raises(StatisticError, match="pad_token_id"):
        diagonal_fisher(model, EXAMPLES, progress=False)


def test_fisher_cli_on_a_classifier_directory_reads_the_label_column(tmp_path):
    """`unmerge fisher CLASSIFIER data.jsonl OUT --estimator empirical` equals diagonal_fisher on the texts encoded
    as the classification evaluation encodes them, with the file's labels."""
    import json

    from click.testing import CliRunner
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from unmerge.cli import main
    from unmerge.data.builtin import builtin_model_path
    from unmerge.evaluation.accuracy import encode_for_classification
    from unmerge.models import load_causal_lm
    from unmerge.stats import Statistic

    _, tokenizer = load_causal_lm(builtin_model_path("builtin:tiny-lm"))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=2,
                     pad_token_id=tokenizer.pad_token_id)
    model = GPT2ForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    rows = [{"text": "the cat sat on the mat", "label": 1}, {"text": "a dog", "label": 0},
            {"text": "  ", "label": 1}, {"text": "rain falls on the plain in spring", "label": 0}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(main, ["fisher", str(tmp_path / "clf"), str(data), str(tmp_path / "out"),
                                    "--estimator", "empirical", "--batch-size", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    stat = Statistic(tmp_path / "out")
    assert stat.meta["model_kind"] == "sequence_classification" and stat.meta["n_examples"] == 3
    texts = [r["text"] for r in rows if r["text"].strip()]
    encoded = encode_for_classification(tokenizer, texts, 32, tokenizer.pad_token_id)
    expected, _ = diagonal_fisher(model, encoded, labels=[1, 0, 0], estimator="empirical", path="loop",
                                  progress=False)
    assert_close({n: stat.get(n) for n in expected}, expected, rtol=1e-4)
    data.write_text(json.dumps({"text": "no label here"}) + "\n")
    res = CliRunner().invoke(main, ["fisher", str(tmp_path / "clf"), str(data), str(tmp_path / "out2"),
                                    "--estimator", "empirical", "--quiet"])
    assert res.exit_code != 0 and "has no 'label' column" in res.output


def test_bench_fisher_reports_every_path_against_the_loop():
    from click.testing import CliRunner

    from unmerge.cli import main

    res = CliRunner().invoke(main, ["bench", "fisher", "--examples", "4", "--batch-size", "2", "--paths",
                                    "hooks,vmap", "--threads", "1", "--repeat", "2"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if "path_used" in line)  # (a progress bar may precede it)
    header = lines[first][lines[first].index("model"):].split()
    rows = [line.split() for line in lines[first + 1 :]]
    assert [r[header.index("path")] for r in rows] == ["loop", "hooks", "vmap"]
    assert {"ex_per_s", "x_loop", "x_loop_cpu", "peak_anon_mb", "repeat"} <= set(header)
    for row in rows:
        assert row[header.index("repeat")] == "2"
        assert row[header.index("path_used")] == row[header.index("path")]
        assert float(row[header.index("max_rel_diff_vs_loop")]) < 1e-4
