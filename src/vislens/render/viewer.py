"""The interactive logit-lens viewer: one self-contained HTML page per image.

Cells are written as static HTML (so the page reads without JavaScript and a
test can count them); a little inline JavaScript adds hover highlighting of
the patch on the image, the top-k detail panel, and the word filter.

The page's markup, style and script are templates/logit_lens_viewer.{html,css,js}
next to this module, filled by vislens.render.html.fill.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from vislens.render.html import esc, fill, image_data_uri

DISPLAY_WIDTH = 384
# what every per-image viewer shares: the page, the image with its patches, the hover mark
BASE_CSS = fill("viewer_base.css")


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
    return fill(
        "logit_lens_viewer.html",
        base_css=BASE_CSS,
        style=fill("logit_lens_viewer.css", width=DISPLAY_WIDTH, height=height),
        script=fill("logit_lens_viewer.js"),
        title=esc(title or "logit lens"),
        img=image_data_uri(image.convert("RGB")),
        patches=patches,
        header=header,
        body="\n".join(body),
        data=json.dumps(data).replace("</", "<\\/"),
        words=words,
        n_tokens=len(tokens),
        n_layers=n_layers,
    )
