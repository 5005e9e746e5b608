"""The diagonal Fisher estimator: per-example squares, equal to a batch-1 loop whatever the batch size."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import make_gpt2
from unmerge.stats.fisher import diagonal_fisher

EXAMPLES = [[1, 5, 9, 3, 7, 2], [4, 4, 8], [6, 1, 2, 3, 4, 5, 6, 7, 8], [9, 2], [3, 3, 3, 3, 1]]


def reference_loop(model, examples, labels_for):
    """Independent computation: one example at a time, loss on its own tokens, plain autograd, square, mean."""
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i, ex in enumerate(examples):
        model.zero_grad()
        ids = torch.tensor([ex])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        labels = labels_for(i, ex)
        logp.gather(-1, labels.unsqueeze(-1)).sum().backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad**2
    return {n: s / len(examples) for n, s in sums.items()}


def assert_close(a, b, rtol=1e-5):
    for name in b:
        scale = b[name].abs().max().clamp_min(1e-30)
        assert (a[name] - b[name]).abs().max() / scale < rtol, name


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("path", ["hooks", "vmap", "loop"])
def test_empirical_fisher_equals_batch1_loop(batch_size, path):
    model = make_gpt2()
    fisher, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=batch_size, path=path,
                                   progress=False)
    ref = reference_loop(model, EXAMPLES, lambda i, ex: torch.tensor(ex[1:]))
    assert info["n_examples"] == len(EXAMPLES) and info["path"] == path
    assert_close(fisher, ref)


@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_sampled_fisher_is_independent_of_batch_size(batch_size):
    model = make_gpt2()
    one, _ = diagonal_fisher(model, EXAMPLES, estimator="sampled", batch_size=1, path="loop", seed=3, progress=False)
    many, _ = diagonal_fisher(model, EXAMPLES, estimator="sampled", batch_size=batch_size, path="vmap", seed=3,
                              progress=False)
    assert_close(many, one)


def test_sampled_differs_from_empirical_and_from_batch_mean_squares():
    model = make_gpt2()
    sampled, _ = diagonal_fisher(model, EXAMPLES, estimator="sampled", batch_size=5, progress=False)
    empirical, _ = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=5, progress=False)
    name = "transformer.h.0.attn.c_attn.weight"
    assert (sampled[name] - empirical[name]).abs().max() > 1e-3 * empirical[name].abs().max()
    # the square of the batch-mean gradient is a different (wrong) estimator: ours must not equal it
    model.zero_grad()
    total = 0
    for ex in EXAMPLES:
        logp = torch.log_softmax(model(input_ids=torch.tensor([ex])).logits[0, :-1], -1)
        total = total + logp.gather(-1, torch.tensor(ex[1:]).unsqueeze(-1)).sum()
    (total / len(EXAMPLES)).backward()
    wrong = dict(model.named_parameters())[name].grad ** 2
    assert (wrong - empirical[name]).abs().max() > 1e-3 * empirical[name].abs().max()


def test_padding_does_not_change_the_fisher():
    model = make_gpt2()
    alone, _ = diagonal_fisher(model, [EXAMPLES[1]], estimator="empirical", batch_size=1, progress=False)
    # batched with a much longer example, EXAMPLES[1] gets 6 pad positions; its contribution must not change
    pair, _ = diagonal_fisher(model, [EXAMPLES[1], EXAMPLES[2]], estimator="empirical", batch_size=2, progress=False)
    other, _ = diagonal_fisher(model, [EXAMPLES[2]], estimator="empirical", batch_size=1, progress=False)
    assert_close({n: 2 * pair[n] - other[n] for n in pair}, alone, rtol=1e-4)


def test_token_level_counts_positions_and_matches_loop():
    model = make_gpt2()
    fast, info = diagonal_fisher(model, EXAMPLES[:3], estimator="empirical", level="token", batch_size=3,
                                 path="vmap", progress=False)
    slow, info_loop = diagonal_fisher(model, EXAMPLES[:3], estimator="empirical", level="token", path="loop",
                                      progress=False)
    assert info["n_examples"] == info_loop["n_examples"] == sum(len(e) - 1 for e in EXAMPLES[:3])
    assert_close(fast, slow)


def test_tied_embedding_gets_one_entry():
    model = make_gpt2()
    fisher, _ = diagonal_fisher(model, EXAMPLES[:2], estimator="empirical", progress=False)
    assert "transformer.wte.weight" in fisher and "lm_head.weight" not in fisher
    assert all((f >= 0).all() for f in fisher.values())


def test_vmap_path_is_used_when_the_config_has_a_pad_token():
    """HF models inspect input ids for padding when pad_token_id is set; the fast path must still apply."""
    model = make_gpt2()
    model.config.pad_token_id = 0
    fisher, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=5, path="vmap", progress=False)
    assert info["path"] == "vmap" and model.config.pad_token_id == 0
    assert_close(fisher, reference_loop(model, EXAMPLES, lambda i, ex: torch.tensor(ex[1:])))


def test_auto_path_takes_hooks_then_vmap_within_its_budget_then_the_loop(monkeypatch):
    import unmerge.stats.fisher as fisher_module
    from unmerge.stats.fisher_hooks import HookPlan, HooksUnsupported

    model = make_gpt2()
    _, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=2, path="auto", progress=False)
    assert info["path"] == "hooks" and "fallback" not in info

    def unsupported(*args):
        raise HooksUnsupported("test")

    monkeypatch.setattr(HookPlan, "build", unsupported)
    monkeypatch.setattr(fisher_module, "VMAP_BUDGET_BYTES", 1)
    _, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=2, path="auto", progress=False)
    assert info["path"] == "loop" and info["fallback"] == "hooks: test"
    monkeypatch.setattr(fisher_module, "VMAP_BUDGET_BYTES", 1 << 40)
    _, info = diagonal_fisher(model, EXAMPLES, estimator="empirical", batch_size=2, path="auto", progress=False)
    assert info["path"] == "vmap"
