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

The page's markup, style and script are templates/attention_viewer.{html,css,js}
next to this module, filled by vislens.render.html.fill.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from vislens.render.html import esc, fill, image_data_uri
from vislens.render.viewer import BASE_CSS, DISPLAY_WIDTH, patch_divs

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
    return fill(
        "attention_viewer.html",
        base_css=BASE_CSS,
        style=fill("attention_viewer.css", width=DISPLAY_WIDTH, height=height),
        script=fill("attention_viewer.js", start=best, width=DISPLAY_WIDTH, height=height,
                    colors=json.dumps(COLORS)),
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
        patches=patch_divs([tuple(b) for b in maps.box], scale,
                           [" obj" if o else "" for o in obj]),
        switch=switch,
        plot=_mass_plot(maps),
        table="\n".join(rows),
        start=best,
        last=n_layers - 1,
        data=json.dumps(data, separators=(",", ":")).replace("</", "<\\/"),
    )
