"""Extract the WordNet 3.0 example sentences into ``wordnet_examples.txt.gz`` (run: ``python -m unmerge.data.build_corpus``).

Needs the WordNet database files (Debian package ``wordnet-base``: ``/usr/share/wordnet/data.{noun,verb,adj,adv}``)
only when rebuilding; the package reads the committed ``.gz`` at run time.

Every synset line of a ``data.*`` file ends with ``| gloss``; the gloss holds the definition followed by example
sentences in double quotes (``| living things collectively; "the oceans are teeming with life"``). Each quoted string
is one example: whitespace is collapsed, empty strings dropped, duplicates dropped (the first occurrence wins, files
read in the order noun, verb, adj, adv). Each output line is ``<lexicographer file name><TAB><sentence>``
(``noun.animal\tthe dog barked``); the lexicographer file is the synset's topic (WordNet's ``lexnames``).
The output is a gzip file with a zero mtime and no file name, so rebuilding it gives identical bytes.
The WordNet 3.0 license, which must accompany any copy, is written to ``LICENSE-WordNet.txt``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
CORPUS_FILE = DATA_DIR / "wordnet_examples.txt.gz"
LICENSE_FILE = DATA_DIR / "LICENSE-WordNet.txt"
DEFAULT_WORDNET = Path("/usr/share/wordnet")
DEFAULT_COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")
POS_FILES = ("noun", "verb", "adj", "adv")

# WordNet 3.0 lexnames(5WN): lexicographer file number -> name.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()

_QUOTED = re.compile(r'"([^"]*)"')

LICENSE_HEADER = """WordNet 3.0 license

The file wordnet_examples.txt.gz in this directory contains the example sentences of WordNet 3.0
(extracted by build_corpus.py), and the files derived from it (the builtin data splits, the synthetic
toxic sets built from those sentences, and the tiny-lm models trained on them) are derived from WordNet.
WordNet is distributed under the following license, which applies to those files:

"""


def extract_examples(wordnet_dir: Path = DEFAULT_WORDNET) -> list[tuple[str, str]]:
    """(lexicographer file name, sentence) for every distinct example sentence, in file order."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for pos in POS_FILES:
        path = Path(wordnet_dir) / f"data.{pos}"
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  "):  # the license header lines
                    continue
                head, sep, gloss = line.partition(" | ")
                if not sep:
                    continue
                lexname = LEXNAMES[int(head.split()[1])]
                for quoted in _QUOTED.findall(gloss):
                    sentence = " ".join(quoted.split())
                    if sentence and sentence not in seen:
                        seen.add(sentence)
                        out.append((lexname, sentence))
    return out


def license_text(copyright_file: Path = DEFAULT_COPYRIGHT) -> str:
    """The WordNet 3.0 license paragraph of a Debian copyright file, un-indented."""
    lines = Path(copyright_file).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("License: WordNet"))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        body.append("" if line.strip() == "." else line[1:])
    return LICENSE_HEADER + "\n".join(body).strip() + "\n"


def write_gzip_text(path: Path, text: str) -> None:
    """Reproducible gzip (mtime 0, no embedded name), written via a temp file and os.replace."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def build(wordnet_dir: Path = DEFAULT_WORDNET, copyright_file: Path = DEFAULT_COPYRIGHT,
          out: Path = CORPUS_FILE, license_out: Path = LICENSE_FILE) -> dict:
    examples = extract_examples(wordnet_dir)
    text = "".join(f"{lex}\t{sentence}\n" for lex, sentence in examples)
    write_gzip_text(out, text)
    license_out.write_text(license_text(copyright_file), encoding="utf-8")
    return {"sentences": len(examples), "bytes_raw": len(text.encode()), "bytes_gz": out.stat().st_size,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET)
    parser.add_argument("--copyright", type=Path, default=DEFAULT_COPYRIGHT)
    parser.add_argument("--out", type=Path, default=CORPUS_FILE)
    parser.add_argument("--license-out", type=Path, default=LICENSE_FILE)
    args = parser.parse_args(argv)
    info = build(args.wordnet_dir, args.copyright, args.out, args.license_out)
    print(f"{info['sentences']} sentences, {info['bytes_raw']} bytes -> {args.out} ({info['bytes_gz']} bytes gz, "
          f"sha256 {info['sha256'][:16]})")


if __name__ == "__main__":
    main()
