"""The interactive attention viewer: one self-contained HTML page per image.

It shows where one query token (the answer position by default) looks: the
image with a heat overlay of its attention over image patch tokens in the
chosen layer (mean over heads, or one head while its thumbnail is hovered),
a strip of every layer, the image / text / first-token mass per layer as a
small inline plot, and a per-layer table that reads without JavaScript.

Anyres families (LLaVA-NeXT, OneVision) read the image twice, as a base view
and as a high-res grid; both are drawn on the same image and a switch picks
the one shown. Attention values travel as bytes (one scale per layer and head)
so a 32-layer, 32-head model with ~2,900 patch tokens stays a few MB, not tens.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from vislens.report.html import esc, image_data_uri
from vislens.report.viewer import BASE_CSS, DISPLAY_WIDTH, patch_divs

VIEW_NAMES = {0: "base view", 1: "high-res view"}
COLORS = {"image": "#1f77b4", "text": "#ff7f0e", "first": "#2ca02c"}  # the PNG plot's C0-C2
TEXT_FIELDS = ("query_token", "first_token", "answer", "prompt", "target")


@dataclass
class AttentionMaps:
    """One image's attention record: what the viewer draws and the .npz holds."""

    patch: np.ndarray  # [layers, heads, patch tokens] attention to each patch token (float16)
    tile: np.ndarray  # [tokens] 0 = base view, 1 = anyres high-res view
    row: np.ndarray
    col: np.ndarray
    box: np.ndarray  # [tokens, 4] x0, y0, x1, y1 in original pixels
    on_object: np.ndarray  # [tokens] bool: the token sees part of the target object
    image_mass: np.ndarray  # [layers, heads]: patch + newline tokens
    text_mass: np.ndarray  # [layers, heads]: text tokens but the first
    first_mass: np.ndarray  # [layers, heads]: the first real token (BOS where there is one)
    query_token: str = ""
    first_token: str = ""
    answer: str = ""
    prompt: str = ""
    target: str = ""

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> AttentionMaps:
        return cls(**{k: (str(v) if k in TEXT_FIELDS else v) for k, v in arrays.items()})


def _quantised(values: np.ndarray) -> tuple[str, list[float]]:
    """[..., tokens] floats -> (base64 bytes, one scale per leading index): byte * scale / 255
    gives the value back within 0.2% of its row's maximum."""
    v = np.asarray(values, dtype=np.float32)
    flat = v.reshape(-1, v.shape[-1])
    scale = flat.max(-1, initial=0.0)
    q = np.where(scale[:, None] > 0, np.round(flat / np.maximum(scale[:, None], 1e-30) * 255), 0)
    data = base64.b64encode(q.astype(np.uint8).tobytes()).decode()
    return data, [float(f"{s:.6g}") for s in scale]


def _mass_plot(maps: AttentionMaps) -> str:
    """Image / text / first-token mass per layer (mean over heads) as inline SVG, with a
    cursor on the shown layer and dashed lines for a hovered head (drawn by the script)."""
    n = maps.image_mass.shape[0]
    w, h, left, right, top, bottom = 380, 150, 34, 10, 8, 26

    def x(layer: float) -> float:
        return left + (layer / max(n - 1, 1)) * (w - left - right) if n > 1 else (w + left) / 2

    def y(v: float) -> float:
        return top + (1 - v) * (h - top - bottom)

    parts = [f'<svg id="massplot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'role="img" aria-label="attention mass per layer">']
    for v in (0, 0.5, 1):
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     f'class="grid"/><text x="{left - 4}" y="{y(v) + 4:.1f}" '
                     f'text-anchor="end">{v:g}</text>')
    step = max(1, int(np.ceil(n / 8)))
    for layer in range(0, n, step):
        parts.append(f'<text x="{x(layer):.1f}" y="{h - 12}" text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{(w + left) / 2:.0f}" y="{h - 1}" text-anchor="middle">layer</text>')
    for name, mass in (("image", maps.image_mass), ("text", maps.text_mass),
                       ("first", maps.first_mass)):
        pts = " ".join(f"{x(i):.1f},{y(float(v)):.1f}" for i, v in
                       enumerate(np.asarray(mass, dtype=float).mean(1)))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[name]}" '
                     'stroke-width="2"/>')
        parts.append(f'<polyline id="h-{name}" points="" fill="none" stroke="{COLORS[name]}" '
                     'stroke-width="1.5" stroke-dasharray="4 3"/>')
    parts.append(f'<line id="cursor" x1="0" x2="0" y1="{top}" y2="{h - bottom}"/>')
    half = (w - left - right) / max(n - 1, 1) / 2 if n > 1 else (w - left - right) / 2
    for layer in range(n):
        parts.append(f'<rect class="lhit" data-l="{layer}" x="{x(layer) - half:.1f}" y="{top}" '
                     f'width="{2 * half:.1f}" height="{h - top - bottom}"/>')
    parts.append("</svg>")
    return "".join(parts)


def render_attention_viewer(image: Image.Image, maps: AttentionMaps, title: str = "") -> str:
    patch = np.asarray(maps.patch, dtype=np.float32)
    if patch.ndim != 3 or patch.shape[-1] == 0:
        raise ValueError("the attention viewer needs [layers, heads, tokens] with at least one "
                         "image token")
    n_layers, n_heads, n_tokens = patch.shape
    scale = DISPLAY_WIDTH / image.width
    height = round(image.height * scale)
    obj = np.asarray(maps.on_object, dtype=bool)
    tiles = sorted({int(t) for t in maps.tile})
    views = [{"tile": t, "label": VIEW_NAMES.get(t, f"tile {t}")} for t in tiles]
    mean = patch.mean(1)  # [L, N]
    mean_data, mean_scale = _quantised(mean)
    head_data, head_scale = _quantised(patch)
    data = {
        "L": n_layers, "H": n_heads, "N": n_tokens,
        "tile": [int(t) for t in maps.tile], "row": [int(r) for r in maps.row],
        "col": [int(c) for c in maps.col], "obj": [int(o) for o in obj],
        "box": [[round(float(v), 1) for v in b] for b in maps.box],
        "scaleX": scale, "views": views,
        "mean": mean_data, "meanScale": mean_scale, "head": head_data, "headScale": head_scale,
        "mass": {k: np.round(np.asarray(m, dtype=float), 4).tolist() for k, m in
                 (("image", maps.image_mass), ("text", maps.text_mass),
                  ("first", maps.first_mass))},
    }
    total = mean.sum(-1)
    rows = []
    for layer in range(n_layers):
        peak = int(mean[layer].argmax())
        share = float(mean[layer, obj].sum() / total[layer]) if total[layer] > 0 else None
        peak_text = (f"{VIEW_NAMES.get(int(maps.tile[peak]), 'tile')} r{int(maps.row[peak])} "
                     f"c{int(maps.col[peak])}{' (object)' if obj[peak] else ''}")
        cells = [f"{100 * float(np.mean(m[layer])):.1f}%" for m in
                 (maps.image_mass, maps.text_mass, maps.first_mass)]
        cells.append("–" if share is None else f"{100 * share:.1f}%")
        rows.append(f'<tr data-l="{layer}"><th>{layer}</th>'
                    + "".join(f"<td>{c}</td>" for c in cells)
                    + f"<td>{esc(peak_text)}</td></tr>")
    best = int(np.asarray(maps.image_mass, dtype=float).mean(1).argmax())
    switch = "" if len(views) < 2 else (
        '<div id="views">view: ' + "".join(
            f'<button type="button" data-view="{v["tile"]}">{esc(v["label"])}</button>'
            for v in views) + "</div>")
    area = 100 * float(obj.mean())
    return _TEMPLATE.format(
        base_css=BASE_CSS,
        title=esc(title or "attention"),
        query=esc(maps.query_token or "?"),
        prompt=esc(maps.prompt),
        answer=esc(maps.answer or "?"),
        target=esc(maps.target or "the object"),
        first=esc(maps.first_token or "?"),
        area=f"{area:.1f}",
        n_tokens=n_tokens,
        n_layers=n_layers,
        n_heads=n_heads,
        img=image_data_uri(image.convert("RGB")),
        width=DISPLAY_WIDTH,
        height=height,
        patches=patch_divs([tuple(b) for b in maps.box], scale,
                           [" obj" if o else "" for o in obj]),
        switch=switch,
        plot=_mass_plot(maps),
        table="\n".join(rows),
        start=best,
        last=n_layers - 1,
        colors=json.dumps(COLORS),
        data=json.dumps(data, separators=(",", ":")).replace("</", "<\\/"),
    )


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
{base_css}
.img,.img img{{width:{width}px;height:{height}px}}
.img img{{filter:brightness(.75)}}
.patch{{border:none}}
.patch.off{{display:none}}
body.objline .patch.obj{{outline:1px dashed rgba(255,255,255,.9);outline-offset:-1px}}
.patch.hl{{border:2px solid #0ff;background:none}}
h2{{font-size:18px;margin:0 0 6px}}
p.lead{{margin:0 0 10px;font-size:14px;max-width:1100px}}
.side{{display:flex;flex-direction:column;gap:8px;font-size:13px;min-width:380px}}
#now{{font-weight:600;font-size:14px}}
#bar{{display:flex;align-items:center;gap:6px;font-size:12px;margin-top:6px}}
#bar span.g{{display:inline-block;width:160px;height:10px;border:1px solid #999}}
#detail{{min-height:3.2em;font-size:13px;width:{width}px;margin-top:6px}}
.cap{{font-size:11px;color:#666;width:{width}px}}
.legend span{{margin-right:12px;font-size:12px}}
.legend i{{display:inline-block;width:14px;height:3px;vertical-align:middle;margin-right:4px}}
#massplot{{font-size:10px;fill:#444}}
#massplot line.grid{{stroke:#e3e3e3}}
#massplot #cursor{{stroke:#c00;stroke-width:1.5}}
#massplot rect.lhit{{fill:transparent;cursor:pointer}}
.thumbs{{display:flex;flex-wrap:wrap;gap:6px}}
.thumb{{font-size:11px;text-align:center;cursor:pointer;padding:2px;border:2px solid transparent}}
.thumb canvas{{display:block;background:#111}}
.thumb.on{{border-color:#c00}} .thumb.pin{{border-color:#06c}}
#views button{{font:inherit;margin-left:4px}} #views button.on{{font-weight:700}}
.ctl{{display:flex;gap:14px;align-items:center;font-size:13px;margin:8px 0}}
table{{border-collapse:collapse;font-size:12px;margin-top:10px}}
td,th{{border:1px solid #e3e3e3;padding:1px 6px;text-align:right;white-space:nowrap}}
thead th{{background:#f4f4f4}} tr.on td,tr.on th{{background:#fde3e3}}
</style></head><body class="objline">
<h2>{title}</h2>
<p class="lead">Where the token <b>{query}</b> looks, in each of the {n_layers} layers
({n_heads} heads): the query of <i>{prompt}</i>, answered <b>{answer}</b>. Brighter patches get
more of its attention (mean over heads; hover a head to see that head alone, click it to keep
it). Dashed outlines: the {target}'s tokens ({area}% of the {n_tokens} image tokens).</p>
<div class="ctl">{switch}
<label>layer <input id="layer" type="range" min="0" max="{last}" value="{start}"></label>
<label><input id="shared" type="checkbox"> one colour scale for all layers</label>
<label><input id="objbox" type="checkbox" checked> outline the object</label></div>
<div class="wrap">
<div><div class="img" id="img"><img src="{img}" alt="input image">
{patches}
</div>
<div id="bar">0 <span class="g" id="grad"></span> <span id="max"></span></div>
<div class="cap">colour: a patch's share of the query's attention, up to the brightest patch
of the view shown</div>
<div id="detail">hover a patch for its share of the attention</div></div>
<div class="side">
<div id="now"></div>
<div class="legend"><span><i style="background:#1f77b4"></i>image tokens</span><span><i
style="background:#ff7f0e"></i>text tokens</span><span><i style="background:#2ca02c"></i>first
token ({first})</span><span>dashed: hovered head</span></div>
{plot}
<div>heads of this layer:</div>
<div class="thumbs" id="heads"></div>
</div></div>
<p style="font-size:13px;margin:12px 0 4px">every layer (mean over heads; hover to show it):</p>
<div class="thumbs" id="layers"></div>
<table id="masses"><thead><tr><th>layer</th><th>image</th><th>text</th><th>first token</th>
<th>object's share of image attention</th><th>peak patch</th></tr></thead>
<tbody>
{table}
</tbody></table>
<script id="att-data" type="application/json">{data}</script>
<script>
const D = JSON.parse(document.getElementById('att-data').textContent);
const COLORS = {colors};
const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const MEAN = bytes(D.mean), HEAD = bytes(D.head);
const S = {{layer: {start}, head: -1, pin: -1, view: D.views[0].tile}};
const patches = [...document.querySelectorAll('.patch')];
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function cmap(t, opaque) {{
  t = Math.max(0, Math.min(1, t)); const x = t * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
  const c = STOPS[i].map((a, k) => Math.round(a + f * (STOPS[i + 1][k] - a)));
  const alpha = opaque ? 1 : 0.12 + 0.8 * Math.sqrt(t);
  return 'rgba(' + c.join(',') + ',' + alpha.toFixed(3) + ')';
}}
document.getElementById('grad').style.background =
  'linear-gradient(90deg,' + [0, .25, .5, .75, 1].map(t => cmap(t, true)).join(',') + ')';
const IMG = document.querySelector('#img img');
function value(l, h, i) {{
  if (h < 0) return MEAN[l * D.N + i] / 255 * D.meanScale[l];
  const k = l * D.H + h; return HEAD[k * D.N + i] / 255 * D.headScale[k];
}}
const inView = i => D.tile[i] === S.view;
function viewMax(l, h) {{
  let m = 0; for (let i = 0; i < D.N; i++) if (inView(i)) m = Math.max(m, value(l, h, i));
  return m;
}}
function scaleFor(l, h) {{
  if (!document.getElementById('shared').checked) return viewMax(l, h);
  let m = 0; for (let k = 0; k < D.L; k++) m = Math.max(m, viewMax(k, h)); return m;
}}
const pct = v => (100 * v).toFixed(v < 0.001 ? 3 : 1) + '%';
function paint(canvas, l, h, width) {{
  const ctx = canvas.getContext('2d'); const s = width / {width} * D.scaleX;
  canvas.width = width; canvas.height = Math.round(width * {height} / {width});
  ctx.fillStyle = '#111'; ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (IMG.complete) {{
    ctx.globalAlpha = 0.45; ctx.drawImage(IMG, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }}
  const m = scaleFor(l, h);
  for (let i = 0; i < D.N; i++) {{
    if (!inView(i)) continue; const b = D.box[i];
    ctx.fillStyle = cmap(m > 0 ? value(l, h, i) / m : 0);
    ctx.fillRect(b[0] * s, b[1] * s, (b[2] - b[0]) * s, (b[3] - b[1]) * s);
  }}
}}
function thumb(onhover, onclick) {{
  const d = document.createElement('div'); d.className = 'thumb';
  const c = document.createElement('canvas'); const t = document.createElement('div');
  d.append(c, t); d.addEventListener('mouseenter', onhover);
  if (onclick) d.addEventListener('click', onclick); return [d, c, t];
}}
const layerThumbs = [], headThumbs = [];
for (let l = 0; l < D.L; l++) {{
  const [d, c, t] = thumb(() => setLayer(l));
  t.textContent = 'L' + l + ' · image ' + pct(mean(D.mass.image[l]));
  document.getElementById('layers').append(d); layerThumbs.push([d, c]);
}}
for (let h = 0; h < D.H; h++) {{
  const [d, c, t] = thumb(() => {{ S.head = h; draw(); }},
    () => {{ S.pin = S.pin === h ? -1 : h; S.head = S.pin; draw(); }});
  d.dataset.h = h; d.addEventListener('mouseleave', () => {{ S.head = S.pin; draw(); }});
  document.getElementById('heads').append(d); headThumbs.push([d, c, t]);
}}
function mean(a) {{ return a.reduce((x, y) => x + y, 0) / a.length; }}
function xy(l, v) {{
  const w = 380, left = 34, right = 10, top = 8, bottom = 26, h = 150;
  const x = D.L > 1 ? left + l / (D.L - 1) * (w - left - right) : (w + left) / 2;
  return x.toFixed(1) + ',' + (top + (1 - v) * (h - top - bottom)).toFixed(1);
}}
function draw() {{
  const l = S.layer, h = S.head, m = scaleFor(l, h);
  patches.forEach((p, i) => {{
    p.classList.toggle('off', !inView(i));
    p.style.background = inView(i) ? cmap(m > 0 ? value(l, h, i) / m : 0) : '';
  }});
  const who = h < 0 ? 'mean over heads' : 'head ' + h;
  const mass = k => h < 0 ? mean(D.mass[k][l]) : D.mass[k][l][h];
  document.getElementById('now').textContent = 'layer ' + l + ', ' + who + ': image ' +
    pct(mass('image')) + ', text ' + pct(mass('text')) + ', first token ' + pct(mass('first'));
  document.getElementById('max').textContent = pct(m);
  layerThumbs.forEach(([d, c], k) => {{ d.classList.toggle('on', k === l); }});
  headThumbs.forEach(([d, c, t], k) => {{
    d.classList.toggle('on', k === h); d.classList.toggle('pin', k === S.pin);
    paint(c, l, k, 72); t.textContent = 'h' + k + ' · ' + pct(D.mass.image[l][k]);
  }});
  const cur = document.getElementById('cursor'); const x = xy(l, 0).split(',')[0];
  cur.setAttribute('x1', x); cur.setAttribute('x2', x);
  for (const k of ['image', 'text', 'first']) document.getElementById('h-' + k)
    .setAttribute('points', h < 0 ? '' : D.mass[k].map((r, j) => xy(j, r[h])).join(' '));
  document.querySelectorAll('#masses tr[data-l]').forEach(r =>
    r.classList.toggle('on', +r.dataset.l === l));
  document.querySelectorAll('#views button').forEach(b =>
    b.classList.toggle('on', +b.dataset.view === S.view));
  document.getElementById('layer').value = l;
}}
function drawLayers() {{ layerThumbs.forEach(([d, c], k) => paint(c, k, -1, 64)); }}
function setLayer(l) {{ S.layer = l; draw(); }}
document.getElementById('layer').addEventListener('input', e => setLayer(+e.target.value));
document.getElementById('shared').addEventListener('change', () => {{ draw(); drawLayers(); }});
document.getElementById('objbox').addEventListener('change', e =>
  document.body.classList.toggle('objline', e.target.checked));
document.querySelectorAll('#views button').forEach(b => b.addEventListener('click', () => {{
  S.view = +b.dataset.view; draw(); drawLayers(); }}));
document.querySelectorAll('#massplot rect.lhit, #masses tr[data-l]').forEach(r =>
  r.addEventListener('mouseenter', () => setLayer(+r.dataset.l)));
let last = null;
document.getElementById('img').addEventListener('mouseover', e => {{
  const p = e.target.closest('.patch'); if (!p) return;
  if (last) last.classList.remove('hl'); p.classList.add('hl'); last = p;
  const i = +p.dataset.i, l = S.layer, h = S.head, v = value(l, h, i);
  let rank = 1; for (let k = 0; k < D.N; k++) if (inView(k) && value(l, h, k) > v) rank++;
  const heads = []; for (let k = 0; k < D.H; k++) heads.push('h' + k + ' ' + pct(value(l, k, i)));
  document.getElementById('detail').innerHTML = '<b>' + D.views.find(w => w.tile === D.tile[i])
    .label + ', row ' + D.row[i] + ', col ' + D.col[i] + (D.obj[i] ? ' (object)' : '') +
    '</b>: ' + pct(v) + ' of the attention in layer ' + l + ' (' + (h < 0 ? 'mean' : 'head ' + h) +
    '), rank ' + rank + '<br>' + heads.join(' · ');
}});
draw(); drawLayers();
IMG.addEventListener('load', () => {{ draw(); drawLayers(); }});
</script></body></html>
"""
