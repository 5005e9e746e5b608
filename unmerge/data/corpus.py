"""The WordNet example corpus and its deterministic splits.

A sentence's split depends only on the sentence itself: the eligible sentences are ordered by
``sha256("unmerge-wordnet-split-v1\\0" + sentence)`` and cut into consecutive blocks of fixed size (below), the
rest going to ``clean-train``. No random state is involved, so the splits are the same on every machine and
Python version. Eligible = every corpus sentence that contains no word of ``toxic_lexicon.txt`` (WordNet has a few
examples such as "he's a damn fool"; they are left out of every split so that the clean splits are clean).

Blocks, in hash order:
    heldout          1000   perplexity (fluency)
    eval-pool        1500   source of ``cloze`` (300 items) and ``prompts`` (100), disjoint from each other
    toxic-demo       3000   sources of the synthetic forget set (see :mod:`unmerge.data.toxic`)
    toxic-heldout    1000   sources of the synthetic held-out toxic set (membership inference)
    clean-demo       3000   retain data (Fisher of the base model, retain perplexity)
    toxic-admixture  5% of what remains: sources of the toxic sentences mixed into the base model's training
    clean-train      the rest (base model and tokenizer training)
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
CORPUS_FILE = DATA_DIR / "wordnet_examples.txt.gz"
LEXICON_FILE = DATA_DIR / "toxic_lexicon.txt"

SPLIT_SALT = "unmerge-wordnet-split-v1"
BLOCKS = (("heldout", 1000), ("eval-pool", 1500), ("toxic-demo", 3000), ("toxic-heldout", 1000),
          ("clean-demo", 3000))
ADMIXTURE_FRACTION = 0.05  # of the base model's training sentences (clean-train + toxic-admixture)
CLOZE_ITEMS = 300
CLOZE_MIN_WORDS = 6
CLOZE_CHOICES = 4
PROMPTS = 100
PROMPT_MIN_WORDS = 6

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@functools.lru_cache(maxsize=None)
def corpus() -> tuple[tuple[str, str], ...]:
    """(lexicographer file name, sentence) pairs of the packaged corpus, in file order."""
    with gzip.open(CORPUS_FILE, "rt", encoding="utf-8") as fh:
        return tuple(tuple(line.rstrip("\n").split("\t", 1)) for line in fh)  # type: ignore[misc]


@functools.lru_cache(maxsize=None)
def lexicon() -> tuple[tuple[str, str], ...]:
    """(category, word) pairs of ``toxic_lexicon.txt``."""
    rows = []
    for line in LEXICON_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            category, word = line.split("\t")
            rows.append((category.strip(), word.strip()))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def lexicon_words() -> frozenset[str]:
    return frozenset(word.lower() for _, word in lexicon())


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (letters, with an inner apostrophe)."""
    return [w.lower() for w in _WORD.findall(text)]


def count_lexicon_words(text: str) -> int:
    """How many words of ``text`` are lexicon words (a possessive such as "fuck's" counts)."""
    vocab = lexicon_words()
    return sum(w in vocab or w.split("'")[0] in vocab for w in words(text))


def has_lexicon_word(text: str) -> bool:
    return count_lexicon_words(text) > 0


def split_key(sentence: str) -> bytes:
    return hashlib.sha256(f"{SPLIT_SALT}\0{sentence}".encode("utf-8")).digest()


@functools.lru_cache(maxsize=None)
def splits() -> dict[str, tuple[str, ...]]:
    """Source sentences of every block (see the module docstring)."""
    eligible = sorted((s for _, s in corpus() if not has_lexicon_word(s)), key=split_key)
    out: dict[str, tuple[str, ...]] = {}
    start = 0
    for name, size in BLOCKS:
        out[name] = tuple(eligible[start:start + size])
        start += size
    rest = eligible[start:]
    n_admix = round(ADMIXTURE_FRACTION * len(rest))
    out["toxic-admixture"] = tuple(rest[:n_admix])
    out["clean-train"] = tuple(rest[n_admix:])
    return out


def item_rng_seed(*parts: object) -> int:
    """A 64-bit seed from the given parts (stable across runs and Python versions)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _last_word_ok(sentence: str) -> bool:
    tokens = sentence.split()
    return len(tokens) >= CLOZE_MIN_WORDS and tokens[-1].isalpha() and tokens[-1].isascii()


@functools.lru_cache(maxsize=None)
def _eval_partition() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(cloze sources, prompt sources): disjoint parts of the eval pool."""
    pool = splits()["eval-pool"]
    cloze_src = tuple(s for s in pool if _last_word_ok(s))[:CLOZE_ITEMS]
    used = set(cloze_src)
    prompt_src = tuple(s for s in pool if s not in used and len(s.split()) >= PROMPT_MIN_WORDS)[:PROMPTS]
    return cloze_src, prompt_src


def _choose(rng, options: list, k: int) -> list:
    """k distinct elements of ``options`` using only ``rng.random()`` (stable across Python versions)."""
    options = list(options)
    picked = []
    for _ in range(k):
        picked.append(options.pop(int(rng.random() * len(options))))
    return picked


@functools.lru_cache(maxsize=None)
def cloze_items() -> tuple[dict, ...]:
    """Multiple-choice last-word items: {prompt, choices (4, each with a leading space), label, source}."""
    import random

    sources, _ = _eval_partition()
    pool = sorted({s.split()[-1] for s in splits()["eval-pool"] if _last_word_ok(s)})
    items = []
    for sentence in sources:
        tokens = sentence.split()
        true = tokens[-1]
        rng = random.Random(item_rng_seed(SPLIT_SALT, "cloze", sentence))
        candidates = [w for w in pool if w.lower() != true.lower()]
        distractors = []
        while len(distractors) < CLOZE_CHOICES - 1:
            word = candidates[int(rng.random() * len(candidates))]
            if word.lower() not in {d.lower() for d in distractors}:
                distractors.append(word)
        choices = _choose(rng, [true] + distractors, CLOZE_CHOICES)  # a seeded permutation
        items.append({"prompt": " ".join(tokens[:-1]), "choices": [" " + c for c in choices],
                      "label": choices.index(true)})
    return tuple(items)


@functools.lru_cache(maxsize=None)
def prompts() -> tuple[str, ...]:
    """Neutral generation prompts: the first 3 or 4 words (chosen per sentence by its hash) of held-out sentences."""
    _, sources = _eval_partition()
    out = []
    for sentence in sources:
        n = 3 + item_rng_seed(SPLIT_SALT, "prompt", sentence) % 2
        out.append(" ".join(sentence.split()[:n]))
    return tuple(out)
