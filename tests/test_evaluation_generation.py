"""Batched left-padded generation equals unbatched greedy generation; seeded sampling repeats exactly."""
from __future__ import annotations

import pytest
import torch

from conftest import make_gpt2
from unmerge.evaluation._testing import word_tokenizer
from unmerge.evaluation.generation import generate, left_pad

PROMPTS = ["the cat", "hello world sun moon sky tree", "a", "big red car on the road", "you are"]


@pytest.fixture(scope="module")
def lm():
    return make_gpt2(), word_tokenizer(vocab_size=64)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_equals_unbatched(lm):
    model, tok = lm
    assert tok.pad_token is None  # eos used as pad
    batched = generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=8, batch_size=5, progress=False)
    single = generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=8, batch_size=1, progress=False)
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    # and the unbatched one is plain model.generate on the unpadded prompt
    for prompt, rec in zip(PROMPTS, single):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             pad_token_id=0, eos_token_id=0)
        assert rec["text"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert [(r["prompt_id"], r["sample"], r["prompt"]) for r in batched] == [(i, 0, p) for i, p in enumerate(PROMPTS)]


def test_sampling_repeats_with_seed(lm):
    model, tok = lm
    kw = dict(samples_per_prompt=3, max_new_tokens=6, do_sample=True, top_p=0.9, top_k=20, temperature=1.0,
              batch_size=4, progress=False)
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, seed=3, **kw)
    assert torch.equal(state, torch.get_rng_state())  # caller's RNG untouched
    b = generate(model, tok, PROMPTS, seed=3, **kw)
    c = generate(model, tok, PROMPTS, seed=4, **kw)
    assert a == b
    assert [r["text"] for r in a] != [r["text"] for r in c]
    assert len(a) == 15 and [r["sample"] for r in a[:3]] == [0, 1, 2]
