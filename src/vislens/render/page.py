"""A report page: one self-contained HTML page of sections (inline CSS, images, viewers);
the study's report is one (vislens.report.sections makes its sections).

Sections are plain data (tables, images, embedded pages) so every experiment
is shown the same way and a test can check each one rendered.

The page's markup and style are templates/report_page.{html,css} next to this module,
filled by vislens.render.html.fill (the sections' fragments are built here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vislens.render.html import esc, fill, png_file_data_uri

_CSS = fill("report_page.css")


@dataclass
class TableData:
    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass
class Section:
    key: str  # anchor id, e.g. "ablation"
    title: str
    intro: str = ""
    tables: list[TableData] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)  # (caption, png path)
    pages: list[tuple[str, str]] = field(default_factory=list)  # (caption, html) in iframes
    notes: list[str] = field(default_factory=list)


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_page(title: str, facts: dict[str, object], sections: Sequence[Section]) -> str:
    toc = "".join(f'<li><a href="#{esc(s.key)}">{esc(s.title)}</a></li>' for s in sections)
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts.items())
    body = "\n".join(_section(s) for s in sections)
    return fill("report_page.html", css=_CSS, title=esc(title), facts=fact_rows, toc=toc,
                body=body)


def _section(s: Section) -> str:
    parts = [f'<section id="{esc(s.key)}" class="experiment"><h2>{esc(s.title)}</h2>']
    if s.intro:
        parts.append(f"<p>{esc(s.intro)}</p>")
    for t in s.tables:
        head = "".join(f"<th>{esc(h)}</th>" for h in t.header)
        rows = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>"
                       for r in t.rows)
        parts.append(f'<table class="result"><caption>{esc(t.caption)}</caption>'
                     f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    grid = " grid" if len(s.images) > 2 else ""  # many small plots: three to a row
    for caption, path in s.images:
        parts.append(f'<figure class="plot{grid}"><img src="{png_file_data_uri(path)}" '
                     f'alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>')
    for caption, page in s.pages:
        parts.append(f'<figure class="viewer"><iframe title="{esc(caption)}" '
                     f'srcdoc="{esc(page)}"></iframe><figcaption>{esc(caption)}</figcaption>'
                     "</figure>")
    parts.extend(f'<p class="note">{esc(n)}</p>' for n in s.notes)
    parts.append("</section>")
    return "\n".join(parts)
