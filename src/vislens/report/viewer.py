"""The interactive logit-lens viewer: one self-contained HTML page per image.

Cells are written as static HTML (so the page reads without JavaScript and a
test can count them); a little inline JavaScript adds hover highlighting of
the patch on the image, the top-k detail panel, and the word filter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from vislens.report.html import esc, image_data_uri

DISPLAY_WIDTH = 384
# what every per-image viewer shares: the page, the image with its patches, the hover mark
BASE_CSS = """
body{font-family:system-ui,sans-serif;margin:12px;color:#222}
.wrap{display:flex;gap:16px;align-items:flex-start}
.img{position:relative;flex:none}
.img img{display:block;image-rendering:pixelated}
.patch{position:absolute;box-sizing:border-box;border:1px solid rgba(255,255,255,.18)}
.patch.hl{border:2px solid #ff0;background:rgba(255,255,0,.35)}
"""


def patch_divs(boxes: Sequence[Sequence[float]], scale: float,
               classes: Sequence[str] | None = None) -> str:
    """One absolutely placed div per image token over its box (id p<i>), so hovering,
    highlighting and colouring a token is plain CSS on a static element."""
    classes = classes if classes is not None else [""] * len(boxes)
    return "\n".join(
        f'<div class="patch{extra}" id="p{i}" data-i="{i}" '
        f'style="left:{b[0] * scale:.1f}px;top:{b[1] * scale:.1f}px;'
        f"width:{(b[2] - b[0]) * scale:.1f}px;height:{(b[3] - b[1]) * scale:.1f}px\"></div>"
        for i, (b, extra) in enumerate(zip(boxes, classes, strict=True)))


@dataclass
class LensToken:
    """One image token: where it sits and what each layer decodes it to."""

    position: int  # sequence position
    row: int
    col: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
    topk: list[list[tuple[str, float]]]  # per layer: [(word, prob), ...], best first
    on_object: bool = False


def render_viewer(image: Image.Image, tokens: Sequence[LensToken], title: str = "",
                  object_words: Sequence[str] = ()) -> str:
    if not tokens:
        raise ValueError("the logit-lens viewer needs at least one image token")
    n_layers = len(tokens[0].topk)
    scale = DISPLAY_WIDTH / image.width
    height = round(image.height * scale)
    patches = patch_divs([t.box for t in tokens], scale,
                         [" obj" if t.on_object else "" for t in tokens])
    header = "".join(f"<th>L{layer}</th>" for layer in range(n_layers))
    body = []
    for i, t in enumerate(tokens):
        cells = "".join(
            f'<td data-t="{i}" data-l="{layer}">{esc(t.topk[layer][0][0])}</td>'
            for layer in range(n_layers)
        )
        mark = " class=\"objrow\"" if t.on_object else ""
        body.append(f'<tr{mark}><th data-t="{i}">r{t.row} c{t.col}</th>{cells}</tr>')
    data = [[[[w, round(p, 4)] for w, p in layer] for layer in t.topk] for t in tokens]
    words = ", ".join(esc(w) for w in object_words)
    return _TEMPLATE.format(
        base_css=BASE_CSS,
        title=esc(title or "logit lens"),
        img=image_data_uri(image.convert("RGB")),
        width=DISPLAY_WIDTH,
        height=height,
        patches=patches,
        header=header,
        body="\n".join(body),
        data=json.dumps(data).replace("</", "<\\/"),
        words=words,
        n_tokens=len(tokens),
        n_layers=n_layers,
    )


_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
{base_css}
.img,.img img{{width:{width}px;height:{height}px}}
.patch.obj{{border-color:rgba(255,255,255,.45)}}
.patch.match{{background:rgba(0,200,255,.35)}}
.tbl{{max-height:80vh;overflow:auto;border:1px solid #ccc}}
table{{border-collapse:collapse;font-size:11px}}
td,th{{border:1px solid #e3e3e3;padding:1px 4px;white-space:nowrap}}
thead th{{position:sticky;top:0;background:#f4f4f4}}
tr.objrow th{{background:#fff3c4}}
td.hl{{outline:2px solid #f80}} td.match{{background:#bdf}}
#detail{{min-height:7em;font-size:13px;margin-top:8px}}
</style></head><body>
<h2>{title}</h2>
<p>{n_tokens} image tokens &times; {n_layers} layers. Rows: image tokens (yellow: on the object;
object words: {words}). Cells: the top token after final norm + unembedding. Hover a cell to see
its patch and top-k; type a word to mark every cell whose top-k contains it.</p>
<div class="wrap">
<div><div class="img" id="img"><img src="{img}" alt="input image">
{patches}
</div>
<p><label>word filter <input id="filter" placeholder="e.g. circle"></label>
<span id="count"></span></p>
<div id="detail">hover a cell</div></div>
<div class="tbl"><table id="lens"><thead><tr><th>token</th>{header}</tr></thead>
<tbody>
{body}
</tbody></table></div>
</div>
<script id="lens-data" type="application/json">{data}</script>
<script>
const D = JSON.parse(document.getElementById('lens-data').textContent);
const detail = document.getElementById('detail');
let last = null;
function clear() {{
  if (last) {{ last[0].classList.remove('hl'); last[1].classList.remove('hl'); }}
}}
document.getElementById('lens').addEventListener('mouseover', e => {{
  const td = e.target.closest('td,th'); if (!td || td.dataset.t === undefined) return;
  const t = +td.dataset.t; const p = document.getElementById('p' + t);
  clear(); p.classList.add('hl'); td.classList.add('hl'); last = [p, td];
  if (td.dataset.l === undefined) {{ detail.textContent = 'token ' + t; return; }}
  const l = +td.dataset.l;
  detail.innerHTML = '<b>' + td.parentNode.firstChild.textContent + ', layer ' + l + '</b><br>' +
    D[t][l].map(([w, q]) => w.replace(/[<>&]/g, '') + ' ' + (100 * q).toFixed(1) + '%')
      .join('<br>');
}});
document.getElementById('filter').addEventListener('input', e => {{
  const w = e.target.value.trim().toLowerCase(); let n = 0;
  document.querySelectorAll('#lens td').forEach(td => {{
    const hit = w !== '' && D[+td.dataset.t][+td.dataset.l].some(([x]) => x.toLowerCase() === w);
    td.classList.toggle('match', hit); n += hit;
  }});
  document.querySelectorAll('.patch').forEach((p, t) => p.classList.toggle('match',
    w !== '' && D[t].some(layer => layer.some(([x]) => x.toLowerCase() === w))));
  document.getElementById('count').textContent = w ? n + ' cells' : '';
}});
</script></body></html>
"""
