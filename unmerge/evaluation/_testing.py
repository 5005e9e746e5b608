"""Tiny word-level tokenizer for tests and examples (no downloads)."""
from __future__ import annotations

from typing import Sequence

WORDS = (
    "the a cat dog sat on mat ran fast slow big small red blue green is was and or not very good bad "
    "you idiot stupid hello world sun moon sky tree bird fish water fire house car road city day night "
    "one two three four five yes no paris london berlin capital of france"
).split()


def word_tokenizer(words: Sequence[str] = WORDS, vocab_size: int | None = None):
    """A ``PreTrainedTokenizerFast`` over whitespace-separated words: id 0 ``<eos>`` (also bos), id 1
    ``<unk>``, then ``words``; no pad token (as GPT-2). ``vocab_size`` checks the vocabulary fits a model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    if vocab_size is not None and len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} tokens do not fit a vocabulary of {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>", unk_token="<unk>")
