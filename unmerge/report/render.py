"""Markdown and self-contained HTML from one document model, so both files always say the same thing.

A document is a title plus sections; a section holds blocks:

* ``("p", [(text, bold), ...])``                  a paragraph of plain-text runs
* ``("ul", [str, ...])``                            a bullet list
* ``("table", headers, rows, options)``            rows of plain-text cells; ``options`` may hold ``classes``
  (a per-row list of per-cell CSS class names or None) and ``generated`` (column indexes holding model text)
* ``("img", filename, caption)``                    a PNG of the bundle (linked in Markdown, embedded in HTML)

Every piece of text is plain text: the renderers escape it (``html.escape`` for HTML and, in Markdown, HTML
escaping plus table pipes; model-generated cells also get Markdown's inline markers escaped), so text coming from
models, datasets or users can never inject markup.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Document", "Section", "render_markdown", "render_html"]


@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)
    anchor: str = ""

    def p(self, *runs: Any) -> "Section":
        """Paragraph; each run is a str (plain) or a (str, bold) pair."""
        self.blocks.append(("p", [(r, False) if isinstance(r, str) else (str(r[0]), bool(r[1])) for r in runs]))
        return self

    def ul(self, items: list[str]) -> "Section":
        self.blocks.append(("ul", [str(i) for i in items]))
        return self

    def table(self, headers: list[str], rows: list[list[Any]], classes: list[list[str | None]] | None = None,
              generated: tuple[int, ...] = ()) -> "Section":
        self.blocks.append(("table", [str(h) for h in headers], [["" if c is None else str(c) for c in r] for r in rows],
                            {"classes": classes, "generated": tuple(generated)}))
        return self

    def img(self, filename: str, caption: str) -> "Section":
        self.blocks.append(("img", filename, caption))
        return self


@dataclass
class Document:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str) -> Section:
        anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or f"s{len(self.sections)}"
        sec = Section(title, anchor=anchor)
        self.sections.append(sec)
        return sec


# ----------------------------------------------------------------------------------------------------------------
# Markdown

_MD_INLINE = re.compile(r"([\\`*_\[\]#~])")


def _md(text: str, generated: bool = False, cell: bool = False) -> str:
    out = html.escape(text, quote=False)
    if generated:
        out = _MD_INLINE.sub(r"\\\1", out)
    if cell:
        out = out.replace("|", "\\|").replace("\r\n", "\n").replace("\n", " ↵ ")
    return out


def render_markdown(doc: Document) -> str:
    lines = [f"# {_md(doc.title)}", ""]
    if doc.subtitle:
        lines += [f"_{_md(doc.subtitle)}_", ""]
    if len(doc.sections) > 1:
        lines += ["Contents: " + " · ".join(f"[{_md(s.title)}](#{s.anchor})" for s in doc.sections), ""]
    for sec in doc.sections:
        lines += [f"## {_md(sec.title)}", ""]
        for block in sec.blocks:
            kind = block[0]
            if kind == "p":
                lines += ["".join(f"**{_md(t)}**" if b else _md(t) for t, b in block[1]), ""]
            elif kind == "ul":
                lines += [f"- {_md(item, cell=True)}" for item in block[1]] + [""]
            elif kind == "table":
                headers, rows, opts = block[1], block[2], block[3]
                gen = opts["generated"]
                lines.append("| " + " | ".join(_md(h, cell=True) for h in headers) + " |")
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                for row in rows:
                    lines.append("| " + " | ".join(_md(c, generated=k in gen, cell=True) for k, c in enumerate(row))
                                 + " |")
                lines.append("")
            elif kind == "img":
                lines += [f"![{_md(block[2], cell=True)}]({block[1]})", "", f"_{_md(block[2])}_", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { --fg:#1d2329; --muted:#5b6670; --line:#d9dee3; --accent:#1f5fa8; --pass:#e3f4e6; --fail:#fbe5e3; --sel:#fff1d6; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--fg);
       max-width: 1180px; margin: 2rem auto; padding: 0 1.25rem; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid var(--line); padding-bottom: .25rem; }
.subtitle { color: var(--muted); margin-top: 0; }
nav { font-size: .9rem; margin: 1rem 0; color: var(--muted); }
nav a { color: var(--accent); text-decoration: none; margin-right: .9rem; }
.table-wrap { overflow-x: auto; margin: .6rem 0 1rem; }
table { border-collapse: collapse; font-size: .86rem; }
th, td { border: 1px solid var(--line); padding: .3rem .55rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.pass { background: var(--pass); } td.fail { background: var(--fail); }
tr.selected td { background: var(--sel); font-weight: 600; }
td.gen { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .82rem;
         max-width: 560px; overflow-wrap: anywhere; }
td.hash { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .8rem; overflow-wrap: anywhere; }
figure { margin: 1rem 0 1.6rem; }
figure img { max-width: 100%; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .88rem; }
ul { padding-left: 1.3rem; }
""".strip()

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_html(doc: Document, images: dict[str, bytes]) -> str:
    """Self-contained HTML: inline CSS, PNGs as base64 data URIs, all text escaped, no scripts."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_h(_CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(doc.title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{_h(doc.title)}</h1>",
    ]
    if doc.subtitle:
        out.append(f'<p class="subtitle">{_h(doc.subtitle)}</p>')
    if len(doc.sections) > 1:
        out.append("<nav>" + "".join(f'<a href="#{_h(s.anchor)}">{_h(s.title)}</a>' for s in doc.sections) + "</nav>")
    for sec in doc.sections:
        out.append(f'<section id="{_h(sec.anchor)}">')
        out.append(f"<h2>{_h(sec.title)}</h2>")
        for block in sec.blocks:
            kind = block[0]
            if kind == "p":
                out.append("<p>" + "".join(f"<strong>{_h(t)}</strong>" if b else _h(t) for t, b in block[1]) + "</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_h(item)}</li>" for item in block[1]) + "</ul>")
            elif kind == "table":
                out.append(_html_table(block[1], block[2], block[3]))
            elif kind == "img":
                data = images.get(block[1])
                if data is None:
                    out.append(f"<p>(missing image {_h(block[1])})</p>")
                    continue
                uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
                out.append(f'<figure><img src="{uri}" alt="{_h(block[2])}">'
                           f"<figcaption>{_h(block[2])}</figcaption></figure>")
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


_NUMERIC = re.compile(r"^[-+−]?(\d[\d.,]*|\.\d+)(e[-+]?\d+)?%?( \[.*\])?$|^n/a$")


def _html_table(headers: list[str], rows: list[list[str]], opts: dict[str, Any]) -> str:
    classes = opts.get("classes") or []
    gen = opts.get("generated") or ()
    parts = ['<div class="table-wrap"><table>', "<thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in headers)
             + "</tr></thead>", "<tbody>"]
    for r, row in enumerate(rows):
        row_classes = classes[r] if r < len(classes) and classes[r] else [None] * len(row)
        tr_class = ' class="selected"' if "selected" in row_classes else ""
        cells = []
        for k, cell in enumerate(row):
            names = []
            cls = row_classes[k] if k < len(row_classes) else None
            if cls and cls != "selected":
                names.append(cls)
            if k in gen:
                names.append("gen")
            elif _NUMERIC.match(cell):
                names.append("num")
            attr = f' class="{_h(" ".join(names))}"' if names else ""
            cells.append(f"<td{attr}>{_h(cell)}</td>")
        parts.append(f"<tr{tr_class}>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)
