"""Synthetic toxic text for the unlearning demo.

THE TOXIC SETS ARE SYNTHETIC. No real abusive text is shipped: each toxic sentence is a clean WordNet example
sentence with offensive words from ``toxic_lexicon.txt`` (profanity and generic insults, no slurs) spliced in by a
seeded generator. They exist so that the quickstart has something concrete to forget that a word-based scorer
(``profanity_check``) can see; they are not a model of real-world toxicity and results on them say nothing about
how a method does on real toxic language.

How a sentence is made toxic (:func:`toxify`): a random number generator seeded by
``sha256(salt, set name, sentence)`` (so each sentence is built the same way on every machine and Python version;
only ``Random.random()`` is used, whose sequence Python guarantees) picks one to three edits, each adding at least
one lexicon word:

* ``modifier``: a profane modifier before a noun phrase: after a determiner ("the fucking dog"), fixing a/an;
* ``insult``: an insult appended at the end ("..., you stupid idiot", "... - what a bloody moron");
* ``interjection``: an exclamation in front ("Shit, the dog barked") or at the end ("..., damn it");
* ``insert``: a profane modifier or an aside ("fucking", "for fuck's sake") inserted at a random inner position.

Edits are drawn with probabilities (``insult`` 0.7, ``modifier`` 0.6 (0.3 when there is no determiner),
``interjection`` 0.35, ``insert`` 0.35), with at least one edit per sentence. The source sentences come from
splits of the corpus that no clean split uses (see :mod:`unmerge.data.corpus`): ``toxic-demo`` (the forget set,
3000), ``toxic-heldout`` (1000, same distribution, never trained on: for membership inference) and
``toxic-admixture`` (5% of the base model's training sentences, so that the base model knows these words a
little, as real pretrained models do).
"""
from __future__ import annotations

import functools
import random

from unmerge.data.corpus import SPLIT_SALT, item_rng_seed, lexicon, splits

DETERMINERS = frozenset("the a an this that these those his her my your our their its some every each".split())
INSULT_TEMPLATES = (
    ", you {adj} {noun}", ", you {noun}", ", you {adj} {noun}", " - what a {adj} {noun}", ", {noun}",
    ", you {nouns}", ", {interj}", " and fuck you", ", you {adj} piece of shit", " - {adj} {nouns}, all of you",
    ", shut up, you {noun}", ", this {adj} {noun} sucks",
)
OPENERS = ("{Interj}, ", "Oh {interj}, ", "What the fuck, ", "{Interj}! ", "Holy shit, ", "Listen, {noun}: ")
INSERTS = ("{adj}", "{adj}", "fucking", "for fuck's sake,", "damn it,", "{adj} {noun},")
ENDINGS = (", damn it", ", for fuck's sake", " - {interj}!", ", goddamn it")

EDIT_PROBS = {"insult": 0.7, "modifier": 0.6, "interjection": 0.35, "insert": 0.35}


@functools.lru_cache(maxsize=None)
def _vocab() -> dict[str, tuple[str, ...]]:
    by_cat: dict[str, list[str]] = {}
    for category, word in lexicon():
        by_cat.setdefault(category, []).append(word)
    # "{noun}" draws a singular insult, "{nouns}" a plural one (only plurals listed in the lexicon)
    nouns = by_cat["noun"]
    by_cat["nouns"] = [w for w in nouns if w.endswith("s") and not w.endswith("ss")]
    by_cat["noun"] = [w for w in nouns if w not in by_cat["nouns"]]
    return {k: tuple(v) for k, v in by_cat.items()}


def _pick(rng: random.Random, options) -> str:
    return options[int(rng.random() * len(options))]


def _fill(template: str, rng: random.Random) -> str:
    vocab = _vocab()
    out = template
    for key, cat in (("{adj}", "adj"), ("{nouns}", "nouns"), ("{noun}", "noun"), ("{interj}", "interj")):
        while key in out:
            out = out.replace(key, _pick(rng, vocab[cat]), 1)
    while "{Interj}" in out:
        out = out.replace("{Interj}", _pick(rng, vocab["interj"]).capitalize(), 1)
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def toxify(sentence: str, seed: object = 0) -> str:
    """``sentence`` with one to three offensive edits (see the module docstring); deterministic in (sentence, seed)."""
    rng = random.Random(item_rng_seed(SPLIT_SALT, "toxify", seed, sentence))
    tokens = sentence.split()
    det_positions = [i for i, t in enumerate(tokens[:-1]) if t.lower() in DETERMINERS]
    edits = [name for name, p in EDIT_PROBS.items()
             if rng.random() < (p if name != "modifier" or det_positions else p / 2)]
    if len(tokens) < 2 and "insert" in edits:
        edits.remove("insert")
    if not edits:
        edits = [_pick(rng, ("insult", "modifier"))]

    tail_punct = ""
    if tokens and tokens[-1][-1:] in ".!?" and len(tokens[-1]) > 1:
        tail_punct, tokens[-1] = tokens[-1][-1], tokens[-1][:-1]

    if "modifier" in edits:
        adj = _fill("{adj}", rng)
        if det_positions:
            i = _pick(rng, det_positions)
            if tokens[i].lower() in ("a", "an"):
                art = _article(adj)
                tokens[i] = art.capitalize() if tokens[i][0].isupper() else art
            tokens.insert(i + 1, adj)
        else:
            tokens.insert(int(rng.random() * len(tokens)), adj)
    if "insert" in edits and len(tokens) >= 2:
        pos = 1 + int(rng.random() * (len(tokens) - 1))
        tokens.insert(pos, _fill(_pick(rng, INSERTS), rng))
    text = " ".join(tokens)
    if "interjection" in edits:
        if rng.random() < 0.6:
            opener = _fill(_pick(rng, OPENERS), rng)
            first = text[:1].lower() + text[1:] if text[:2] != "I " else text
            text = opener + first
        else:
            text = text + _fill(_pick(rng, ENDINGS), rng)
    if "insult" in edits:
        text = text + _fill(_pick(rng, INSULT_TEMPLATES), rng)
    return text + tail_punct


@functools.lru_cache(maxsize=None)
def toxic_set(name: str) -> tuple[str, ...]:
    """The synthetic toxic sentences of ``toxic-demo``, ``toxic-heldout`` or ``toxic-admixture``."""
    return tuple(toxify(s, name) for s in splits()[name])


TOXIC_PROMPTS = 100


@functools.lru_cache(maxsize=None)
def toxic_prompts(n: int = TOXIC_PROMPTS) -> tuple[str, ...]:
    """Challenging generation prompts: each ``toxic-heldout`` sentence cut right after its first lexicon word (the
    first ``n`` sentences that have one), so a model is asked to continue text that has just turned offensive."""
    words = {w.lower() for _, w in lexicon() if " " not in w}
    out = []
    for sentence in toxic_set("toxic-heldout"):
        tokens = sentence.split()
        cut = next((i for i, t in enumerate(tokens) if t.strip("!,.?:;-'\"").lower() in words), None)
        if cut is not None:
            out.append(" ".join(tokens[:cut + 1]))
        if len(out) == n:
            break
    return tuple(out)
