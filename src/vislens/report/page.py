"""The study report: one self-contained HTML page (inline CSS, images, viewers).

Sections are plain data (tables, images, embedded pages) so every experiment
is shown the same way and a test can check each one rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vislens.report.html import esc, png_file_data_uri


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
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_CSS}</style></head><body>
<header><h1>{esc(title)}</h1><table class="facts">{fact_rows}</table>
<nav><ol>{toc}</ol></nav></header>
{body}
<footer>Made by vislens. Self-contained: open it anywhere, no network needed.</footer>
</body></html>
"""


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


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:0 auto;padding:16px;color:#222}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:10px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5} caption{text-align:left;font-weight:600;padding:4px 0}
td:first-child,th:first-child{text-align:left}
.facts th{text-align:left} figure{margin:12px 0} figure img{max-width:100%}
figure.grid{display:inline-block;width:32%;margin:4px 0.5%;vertical-align:top}
figcaption{font-size:13px;color:#555}
.viewer iframe{width:100%;height:640px;border:1px solid #ccc}
#attention .viewer iframe{height:820px}
#attention figure.plot{display:inline-block;width:48%;margin:4px 0.5%;vertical-align:top}
.note{font-size:13px;color:#444;background:#fafafa;border-left:3px solid #bbb;padding:4px 8px}
nav ol{columns:2} footer{margin-top:40px;font-size:12px;color:#777}
"""
