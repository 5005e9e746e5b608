"""Gram and K-FAC statistics of a sequence-classification model (GPT2ForSequenceClassification) against an
independent computation: one unpadded example at a time, plain hooks and autograd of log p(y | x)."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_rel, linear_layer_io
from unmerge.errors import StatisticError
from unmerge.stats.fisher import draw_labels
from unmerge.stats.gram import gram_statistics
from unmerge.stats.kfac import kfac_factors

PAD = 5  # not 0: batches padded with anything but config.pad_token_id would pool the wrong token
EXAMPLES = [[1, 7, 9, 3, 7, 2], [4, 4, 8], [6, 1, 2, 3, 4, 9, 6, 7, 8], [9, 2], [3, 3, 3, 3, 1]]
LABELS = [0, 2, 1, 1, 0]


def make_classifier(seed: int = 0, n_labels: int = 3):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=n_labels,
                     pad_token_id=PAD, bos_token_id=0, eos_token_id=0)
    return GPT2ForSequenceClassification(cfg).eval()


def reference(model, examples, labels):
    """Per linear layer: inputs X and gradients Γ of log p(y_i | x_i) w.r.t. the layer output (conftest)."""
    return linear_layer_io(model, examples, lambda logits, ids, i: torch.log_softmax(logits, -1)[labels[i]])


@pytest.mark.parametrize("batch_size", [2, 5])
def test_seqcls_gram_and_empirical_kfac_match_the_independent_computation(batch_size):
    model = make_classifier()
    grams, ginfo = gram_statistics(model, EXAMPLES, batch_size=batch_size, progress=False)
    factors, info = kfac_factors(model, EXAMPLES, estimator="empirical", labels=LABELS, batch_size=batch_size,
                                 progress=False)
    xs, gs, modules = reference(model, EXAMPLES, LABELS)
    n_tokens, n_examples = sum(map(len, EXAMPLES)), len(EXAMPLES)
    assert ginfo["model_kind"] == info["model_kind"] == "sequence_classification"
    assert info["g_normalization"] == "per_example" and info["n_predicted_tokens"] == n_examples
    assert "score" in modules and set(grams) == {f"{n}.gram" for n in modules}
    for name, module in modules.items():
        x, g = xs[name], gs[name]
        assert_rel(grams[f"{name}.gram"], x.T @ x / n_tokens, what=name)
        d = x.shape[1]
        a = factors[f"{name}.A"]
        assert_rel(a[:d, :d], x.T @ x / n_tokens, what=name)
        if module.bias is not None:
            assert_rel(a[:d, d], x.mean(0), what=name)
            assert float(a[d, d]) == 1.0
        # G = (1/n_examples) Σ_tokens g gᵀ: A ⊗ G on the per-example scale of the diagonal Fisher
        assert_rel(factors[f"{name}.G"], g.T @ g / n_examples, rtol=1e-4, what=name)
        assert float(factors[f"{name}.G"].abs().max()) > 0


def test_seqcls_sampled_kfac_draws_the_fisher_labels_whatever_the_batch():
    model = make_classifier()
    seed = 3
    one, info = kfac_factors(model, EXAMPLES, estimator="sampled", batch_size=1, seed=seed, progress=False)
    many, _ = kfac_factors(model, EXAMPLES, estimator="sampled", batch_size=4, seed=seed, progress=False)
    with torch.no_grad():  # the labels the estimator must have drawn: the diagonal Fisher's per-example draws
        logits = torch.cat([model(input_ids=torch.tensor([ex])).logits for ex in EXAMPLES])
    drawn = draw_labels(logits.unsqueeze(1), [seed * 1_000_003 + i for i in range(len(EXAMPLES))]).squeeze(1)
    empirical, _ = kfac_factors(model, EXAMPLES, estimator="empirical", labels=drawn.tolist(), batch_size=2,
                                progress=False)
    for key in one:
        assert_rel(many[key], one[key], rtol=1e-4, what=key)
        assert_rel(empirical[key], one[key], rtol=1e-4, what=key)


def test_seqcls_empirical_kfac_needs_labels_and_a_pad_id():
    model = make_classifier()
    with pytest.raises(StatisticError, match="observed labels"):
        kfac_factors(model, EXAMPLES, estimator="empirical", progress=False)
    model.config.pad_token_id = None
    with pytest.raises(StatisticError, match="pad_token_id"):
        gram_statistics(model, EXAMPLES, progress=False)
