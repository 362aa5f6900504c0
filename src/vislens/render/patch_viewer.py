"""The interactive causal-tracing viewer: one self-contained HTML page per pair.

It answers "which single image tokens bring the answer back?" the way the logit-lens viewer
answers "what does each token decode to?": the clean image with every image token coloured
by the share of the logit difference it restores alone (exact patching, where it was
patched) or by attribution patching's estimate of it (every token), a button per (site
kind, layer), the corrupted image beside it with the hovered token marked, and tables that
read without JavaScript (per layer: Spearman and top-k agreement; per group: the pair's
restored shares; per token patched alone: both values).

Any-res and tiling families show one image several times (a base view and a high-res grid,
or crops and a global view); their tokens overlap on the picture, so `image_views` splits
them into views a switch picks from, as the attention viewer does.

Markup, style and script: templates/patch_viewer.{html,css,js}, filled by render.html.fill.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vislens.render.html import esc, fill, image_data_uri
from vislens.render.viewer import BASE_CSS, DISPLAY_WIDTH, patch_divs

WHOLE = 0.9  # a tile whose tokens cover this share of the image is a view of its own


@dataclass
class TokenEffects:
    """One (site kind, layer) of the per-token comparison of one pair, over its image tokens.

    exact: share restored by patching the token alone (None where it was not patched alone:
    above --exact-tokens only evenly spaced tokens are); estimate: attribution's estimate.
    """

    kind: str
    layer: int
    exact: Sequence[float | None]
    estimate: Sequence[float]
    spearman: float | None = None
    topk_overlap: float | None = None
    topk_restored: float | None = None
    k: int = 0


def image_views(boxes: np.ndarray, tiles: Sequence[int], size: tuple[int, int]
                ) -> list[tuple[str, list[int]]]:
    """Token indices per view of the picture: each tile that covers the whole image (a base
    view, a global view, a thumbnail) alone, every other tile (crops, a high-res grid cut in
    tiles) together; coarsest first. One view where no tokens overlap."""
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    tiles = np.asarray(tiles, dtype=np.int64)
    w, h = size
    views: list[tuple[str, np.ndarray]] = []
    rest = []
    for t in sorted(set(tiles.tolist())):
        idx = np.flatnonzero(tiles == t)
        b = boxes[idx]
        span = (b[:, 2].max() - b[:, 0].min()) * (b[:, 3].max() - b[:, 1].min())
        if span >= WHOLE * w * h:
            views.append(("view", idx))
        else:
            rest.append(idx)
    if rest:
        views.append(("crops", np.concatenate(rest)))
    if len(views) == 1:
        return [("image tokens", views[0][1].tolist())]

    def px(idx: np.ndarray) -> float:
        b = boxes[idx]
        return float(np.sqrt(np.mean((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))))

    views.sort(key=lambda v: px(v[1]), reverse=True)
    return [(f"{name}: {len(idx)} tokens of ~{px(idx):.0f} px", idx.tolist())
            for name, idx in views]


def _number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 5)


def _fmt(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3f}"


def render_patch_viewer(clean: Image.Image, corrupt: Image.Image, boxes: np.ndarray,
                        tiles: Sequence[int], positions: Sequence[int],
                        on_object: Sequence[bool], effects: Sequence[TokenEffects],
                        groups: Sequence[tuple[str, list[int], dict[str, list[float | None]]]]
                        = (), title: str = "", lead: str = "") -> str:
    """groups: (site kind, layers, {group: share per layer}) of this pair, drawn as tables."""
    n = len(positions)
    if not n or not effects:
        raise ValueError("the patch viewer needs image tokens and at least one token layer")
    for e in effects:
        if len(e.exact) != n or len(e.estimate) != n:
            raise ValueError(f"{e.kind} layer {e.layer}: {len(e.exact)} exact and "
                             f"{len(e.estimate)} estimated values for {n} image tokens")
    scale = DISPLAY_WIDTH / clean.width
    height = round(clean.height * scale)
    views = image_views(boxes, tiles, clean.size)
    data = {
        "pos": [int(p) for p in positions], "tile": [int(t) for t in tiles],
        "obj": [bool(o) for o in on_object], "scale": scale,
        "box": [[round(float(v), 1) for v in b] for b in np.asarray(boxes).reshape(-1, 4)],
        "views": [idx for _, idx in views],
        "effects": [{"kind": e.kind, "layer": e.layer, "exact": [_number(x) for x in e.exact],
                     "estimate": [_number(x) for x in e.estimate]} for e in effects],
    }
    buttons = "".join(f'<button type="button" data-e="{i}">{esc(e.kind)} L{e.layer}</button>'
                      for i, e in enumerate(effects))
    switch = "" if len(views) < 2 else (
        '<span id="views">view: ' + "".join(
            f'<button type="button" data-view="{i}">{esc(label)}</button>'
            for i, (label, _) in enumerate(views)) + "</span>")
    agreement = "\n".join(
        f"<tr><th>{esc(e.kind)}</th><td>{e.layer}</td><td>{_fmt(e.spearman)}</td>"
        f"<td>{e.k}</td><td>{_fmt(e.topk_overlap)}</td><td>{_fmt(e.topk_restored)}</td>"
        f"<td>{sum(x is not None and math.isfinite(x) for x in e.exact)}</td></tr>"
        for e in effects)
    group_tables = "\n".join(
        f'<table class="groups"><caption>{esc(kind)}: share restored by each group</caption>'
        "<thead><tr><th>group \\ layer</th>" + "".join(f"<th>{x}</th>" for x in layers)
        + "</tr></thead><tbody>" + "".join(
            f"<tr><th>{esc(g)}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in values) + "</tr>"
            for g, values in shares.items()) + "</tbody></table>"
        for kind, layers, shares in groups)
    measured = [i for i in range(n) if any(e.exact[i] is not None and math.isfinite(e.exact[i])
                                           for e in effects)]
    head = "".join(f"<th>{esc(e.kind)} L{e.layer}<br>exact</th><th>attrib.</th>"
                   for e in effects)
    body = "\n".join(
        f'<tr data-t="{i}"{" class=objrow" if on_object[i] else ""}><th>{positions[i]}</th>'
        + "".join(f"<td>{_fmt(e.exact[i])}</td><td>{_fmt(e.estimate[i])}</td>" for e in effects)
        + "</tr>" for i in measured)
    return fill(
        "patch_viewer.html",
        base_css=BASE_CSS,
        style=fill("patch_viewer.css", width=DISPLAY_WIDTH, height=height),
        script=fill("patch_viewer.js"),
        title=esc(title or "causal tracing"),
        lead=esc(lead),
        clean=image_data_uri(clean.convert("RGB")),
        corrupt=image_data_uri(corrupt.convert("RGB").resize(clean.size)),
        patches=patch_divs([tuple(b) for b in np.asarray(boxes).reshape(-1, 4)], scale,
                           [" obj" if o else "" for o in on_object]),
        buttons=buttons,
        switch=switch,
        agreement=agreement,
        groups=group_tables,
        head=head,
        body=body,
        n_tokens=n,
        n_measured=len(measured),
        data=json.dumps(data, separators=(",", ":")).replace("</", "<\\/"),
    )
