"""Every HTML page the report code writes, rendered from fixed inputs, against stored bytes.

The expected pages under tests/data/report_templates/ were rendered by the code as it was
before the templates moved out of Python strings into src/vislens/render/templates/, so a
change to a template (or to how it is filled) shows up here as a byte difference.

The input image's PNG is replaced by a digest of its pixels: Pillow's PNG encoder (its zlib)
may change between releases inside our pin, and that is no part of the templates. Report
images are read as raw file bytes, so they are fixed bytes here.

After an intended change to a page, regenerate the expected files and read the diff:
    PYTHONPATH=src python tests/test_report_templates.py
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vislens.render import attention_viewer, viewer
from vislens.render.attention_viewer import AttentionMaps, render_attention_viewer
from vislens.render.html import fill
from vislens.render.page import Section, TableData, render_page
from vislens.render.viewer import LensToken, render_viewer

EXPECTED = Path(__file__).parent / "data" / "report_templates"
# text that a naive substitution would trip over: braces, dollars, markup, a script end
TRICKY = "{title} {{x}} $title ${n_layers} $$ <b>&amp;</b> </script> ' \""


def fake_image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    digest = hashlib.sha256(image.tobytes()).hexdigest()[:16]
    return f"data:image/{fmt.lower()};base64,{image.mode}-{image.width}x{image.height}-{digest}"


def test_image() -> Image.Image:
    pixels = (np.arange(40 * 30 * 3) * 7 % 256).astype(np.uint8).reshape(30, 40, 3)
    return Image.fromarray(pixels)


test_image.__test__ = False  # a helper, not a test


def lens_page() -> str:
    tokens = []
    for i in range(6):
        r, c = divmod(i, 3)
        topk = [[("circle" if (i + layer) % 4 == 0 else f"w{i}{layer}", 0.5 + 0.01 * i),
                 (TRICKY if layer == 1 else "<&>", 0.123456)] for layer in range(3)]
        tokens.append(LensToken(position=5 + i, row=r, col=c,
                                box=(c * 13.3, r * 15.0, (c + 1) * 13.3, (r + 1) * 15.0),
                                topk=topk, on_object=i in (1, 4)))
    return render_viewer(test_image(), tokens, title=TRICKY, object_words=["circle", TRICKY])


def attention_maps(layers: int, heads: int, tiles: tuple[int, ...], text: str) -> AttentionMaps:
    rng = np.random.default_rng(layers * 10 + heads)
    tile, row, col, box = [], [], [], []
    for t in tiles:
        for i in range(6):
            r, c = divmod(i, 3)
            w = 40 / 3 / (t + 1)
            tile.append(t), row.append(r), col.append(c)
            box.append([c * w, r * 15.0 / (t + 1), (c + 1) * w, (r + 1) * 15.0 / (t + 1)])
    n = len(tile)
    patch = rng.random((layers, heads, n)).astype(np.float16) / n
    patch[0, 0, 0] = 0  # a zero scale for one row of the quantised bytes
    mass = rng.dirichlet([1, 1, 1], size=(layers, heads))
    return AttentionMaps(
        patch=patch, tile=np.array(tile), row=np.array(row), col=np.array(col),
        box=np.array(box, dtype=np.float32), on_object=np.arange(n) % 4 == 1,
        image_mass=mass[..., 0], text_mass=mass[..., 1], first_mass=mass[..., 2],
        query_token=text, first_token="<s>", answer=text, prompt=text, target=text)


def attention_pages() -> dict[str, str]:
    return {
        "attention_viewer.html": render_attention_viewer(
            test_image(), attention_maps(3, 2, (0,), TRICKY), title=TRICKY),
        "attention_viewer_anyres.html": render_attention_viewer(
            test_image(), attention_maps(4, 3, (0, 1), "yes"), title="anyres"),
        "attention_viewer_one_layer.html": render_attention_viewer(
            test_image(), attention_maps(1, 1, (0,), ""), title=""),
    }


def report_page(tmp: Path) -> str:
    pngs = []
    for i in range(3):
        path = tmp / f"plot{i}.png"
        path.write_bytes(bytes(range(i, 64 + i)))  # read as raw bytes: any fixed bytes do
        pngs.append((f"plot {i} {TRICKY}", path))
    sections = [
        Section("accuracy", "Accuracy", intro=TRICKY,
                tables=[TableData("acc " + TRICKY, ["task", "accuracy", "n"],
                                  [["polling", 0.97123, 10], ["{x}", None, "$y"]])],
                images=pngs[:1], notes=["a note", TRICKY]),
        Section("logit-lens", "Logit lens " + TRICKY, images=pngs,
                pages=[("viewer " + TRICKY, lens_page())]),
        Section("empty", "Nothing"),
    ]
    return render_page("vislens study: " + TRICKY, {"model": "toy", TRICKY: 1.5}, sections)


def pages(tmp: Path) -> dict[str, str]:
    return {"lens_viewer.html": lens_page(), **attention_pages(),
            "report.html": report_page(tmp)}


def stub_images(patch):
    for module in (viewer, attention_viewer):
        patch(module, "image_data_uri", fake_image_data_uri)


def test_pages_are_byte_identical_to_the_stored_renders(monkeypatch, tmp_path):
    stub_images(monkeypatch.setattr)
    rendered = pages(tmp_path)
    assert sorted(rendered) == sorted(p.name for p in EXPECTED.glob("*.html"))
    for name, page in rendered.items():
        expected = (EXPECTED / name).read_bytes()
        assert page.encode() == expected, f"{name} differs from {EXPECTED / name}"


def test_tricky_text_is_escaped_not_substituted(monkeypatch, tmp_path):
    stub_images(monkeypatch.setattr)
    page = lens_page()
    assert "{title} {{x}} $title ${n_layers} $$ &lt;b&gt;&amp;amp;&lt;/b&gt;" in page
    assert page.count("</script>") == 2  # the two script elements; none from the data


def test_fill_is_strict_both_ways():
    with pytest.raises(KeyError, match="width"):  # a placeholder with no value
        fill("logit_lens_viewer.css", height=1)
    with pytest.raises(KeyError, match=r"has no \$colour"):  # a value with no placeholder
        fill("logit_lens_viewer.css", width=1, height=1, colour="red")
    assert "{width:7px;height:8px}" in fill("logit_lens_viewer.css", width=7, height=8)


if __name__ == "__main__":
    import tempfile

    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        stub_images(mp.setattr)
        EXPECTED.mkdir(parents=True, exist_ok=True)
        for name, page in pages(Path(tmp)).items():
            (EXPECTED / name).write_bytes(page.encode())
            print(f"wrote {EXPECTED / name} ({len(page)} chars)", file=sys.stderr)
