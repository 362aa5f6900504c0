"""The causal-tracing viewer (render/patch_viewer.py): what it holds, how it splits
overlapping views, and, in Chromium, what a person sees when hovering and switching."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from vislens.data import open_dataset
from vislens.experiments import patching
from vislens.render.patch_viewer import TokenEffects, image_views, render_patch_viewer


def _grid(x0: float, y0: float, x1: float, y1: float, n: int) -> np.ndarray:
    xs, ys = np.linspace(x0, x1, n + 1), np.linspace(y0, y1, n + 1)
    return np.array([[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(n) for c in range(n)])


def test_one_grid_is_one_view():
    views = image_views(_grid(0, 0, 64, 64, 4), [0] * 16, (64, 64))
    assert views == [("image tokens", list(range(16)))]


def test_a_base_view_and_a_high_res_view_are_two_views_coarse_first():
    """LLaVA-NeXT / OneVision: the base view and the high-res grid both cover the image."""
    boxes = np.concatenate([_grid(0, 0, 64, 64, 8), _grid(0, 0, 64, 64, 2)])
    tiles = [1] * 64 + [0] * 4
    (coarse, a), (fine, b) = image_views(boxes, tiles, (64, 64))
    assert a == [64, 65, 66, 67] and b == list(range(64))
    assert coarse.startswith("view: 4 tokens of ~32 px") and fine.startswith("view: 64 tokens")


def test_crops_together_and_the_global_view_alone():
    """SmolVLM / InternVL: four crops, each a quarter of the image, and a global view."""
    crops = [_grid(x, y, x + 32, y + 32, 2) for y in (0, 32) for x in (0, 32)]
    boxes = np.concatenate([*crops, _grid(0, 0, 64, 64, 2)])
    tiles = [t for t in range(4) for _ in range(4)] + [4] * 4
    views = image_views(boxes, tiles, (64, 64))
    assert [label.split(":")[0] for label, _ in views] == ["view", "crops"]
    assert views[0][1] == [16, 17, 18, 19] and views[1][1] == list(range(16))


def _page(exact=(0.5, None, -0.25, 0.0)) -> str:
    image = Image.new("RGB", (64, 64), (40, 40, 40))
    boxes = _grid(0, 0, 64, 64, 2)
    effects = [TokenEffects("residual", 1, list(exact), [0.4, 0.1, -0.2, 0.01], 0.8, 1.0, 0.6, 1),
               TokenEffects("mlp", 1, list(exact), [0.0, 0.0, 0.0, 0.0], None, 0.0, 0.0, 1)]
    groups = [("residual", [0, 1], {"object": [1.0, 0.5], "question": [0.0, None]})]
    return render_patch_viewer(image, image, boxes, [0] * 4, [5, 6, 7, 8],
                               [True, False, False, False], effects, groups, title="t<1>",
                               lead="a & b")


def test_the_page_holds_every_token_value_and_table():
    html = _page()
    assert html.count('class="patch') == 4 and html.count('class="patch obj"') == 1
    data = json.loads(re.search(r'id="patch-data" type="application/json">(.*?)</script>',
                                html, re.S).group(1))
    assert data["pos"] == [5, 6, 7, 8] and data["obj"] == [True, False, False, False]
    assert data["effects"][0]["exact"] == [0.5, None, -0.25, 0.0]
    assert data["effects"][1]["kind"] == "mlp" and data["views"] == [[0, 1, 2, 3]]
    # the tables read without JavaScript: three tokens were patched alone, one was not
    body = html.split('<table id="tokens">')[1]
    assert body.count("<tr data-t=") == 3 and 'data-t="1"' not in body
    assert "<td>0.500</td><td>0.400</td>" in body
    assert "<th>object</th><td>1.000</td><td>0.500</td>" in html and "<td>–</td>" in html
    assert "t&lt;1&gt;" in html and "a &amp; b" in html
    assert "http://" not in html and "https://" not in html


def test_mismatched_values_are_refused():
    with pytest.raises(ValueError, match="3 exact and 4 estimated values for 4 image tokens"):
        _page(exact=(0.5, None, 0.1))


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    """A viewer of a real toy run: two site kinds at one token layer."""
    import vislens

    out = tmp_path_factory.mktemp("patch")
    config = patching.PatchConfig(kinds=("residual", "mlp"), layers="1", token_layers="1",
                                  area=(0.0, 350.0), maps=1)
    s = patching.execute(vislens.load("toy"), open_dataset("shapesworld:1000", n=3), config,
                         out, {"model": "toy"})
    assert len(s["viewers"]) == 1
    return s["viewers"][0]


@pytest.mark.browser
@pytest.mark.slow  # Chromium starts for it
def test_the_viewer_in_chromium(viewer, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"file://{viewer}")
    patches = page.locator("#img .patch")
    n = patches.count()
    assert n > 0 and page.locator("#img .patch.off").count() == 0
    assert page.locator("#now").inner_text() == "residual, layer 1, exact patching"

    def colours() -> list[str]:
        return page.eval_on_selector_all("#img .patch", "ps => ps.map(p => p.style.background)")

    exact = colours()
    assert any(c.startswith("rgba(214, 39, 40") for c in exact)  # some token restores
    page.locator('#what input[value="estimate"]').check()
    assert page.locator("#now").inner_text() == "residual, layer 1, attribution patching"
    assert colours() != exact
    page.locator('#effects button[data-e="1"]').click()
    assert page.locator("#now").inner_text().startswith("mlp, layer 1")
    first = page.locator("#img .patch.obj").first
    first.hover()
    detail = page.locator("#detail").inner_text()
    assert "on the object" in detail and "residual layer 1: exact" in detail
    assert "mlp layer 1: exact" in detail
    assert page.locator("#mark").is_visible()
    page.screenshot(path=str(tmp_path / "viewer.png"))
    assert errors == [] and (tmp_path / "viewer.png").stat().st_size > 10_000
