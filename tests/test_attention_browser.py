"""The attention viewer and report section as a person sees them: headless Chromium."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_models import build

import vislens
from vislens.data import shapesworld
from vislens.experiments import attention
from vislens.models.vlm import VLM
from vislens.render.page import render_page
from vislens.report.sections import attention_section

# Chromium starts once for the module (~5 s on 2 cores): all in the full run only
pytestmark = [pytest.mark.browser, pytest.mark.slow]
BRIGHTEST = "rgb(252, 255, 164)"  # the colour map's top, what the peak patch must show


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The shipped toy, whose answer position reads the object in its middle layers."""
    out = tmp_path_factory.mktemp("toy")
    vlm = vislens.load("toy")
    summary = attention.execute(vlm, shapesworld.generate(3, seed=1000),
                                attention.AttentionConfig(viewers=1), out, {"model": "toy"})
    return summary, out


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def backgrounds(page) -> list[str]:
    return page.eval_on_selector_all(
        ".patch", "els => els.map(e => getComputedStyle(e).backgroundColor)")


def rgb(color: str) -> str:
    """'rgba(r, g, b, a)' -> 'rgb(r, g, b)': the colour without its opacity."""
    return "rgb(" + ", ".join(color[color.index("(") + 1:-1].split(", ")[:3]) + ")"


def test_viewer_draws_the_stored_attention_and_reacts(browser, toy_run):
    summary, out = toy_run
    sample = summary["viewers"][0]["sample"]
    maps = attention.load_maps(attention.maps_path(out, sample))
    page, errors = open_page(browser, (out / "viewer" / f"{sample}.html").as_uri())
    n_layers = maps.patch.shape[0]
    assert page.locator("#masses tbody tr").count() == n_layers
    assert page.locator("#layers .thumb").count() == n_layers
    assert page.locator("#heads .thumb").count() == maps.patch.shape[1]
    start = int(maps.image_mass.mean(1).argmax())
    assert page.locator("#now").inner_text().startswith(f"layer {start}, mean over heads")

    mean = maps.patch.astype(float).mean(1)  # the overlay's brightest patch is the data's peak
    colours = backgrounds(page)
    assert rgb(colours[int(mean[start].argmax())]) == BRIGHTEST
    assert sum(rgb(c) == BRIGHTEST for c in colours) <= 2

    peak = int(mean[start].argmax())
    patch = page.locator(f"#p{peak}")
    patch.hover()
    assert "hl" in patch.get_attribute("class")
    detail = page.locator("#detail").inner_text()
    assert f"row {int(maps.row[peak])}, col {int(maps.col[peak])}" in detail and "rank 1" in detail

    head = int(np.argmax([np.abs(maps.patch[start, h].astype(float) - mean[start]).sum()
                          for h in range(maps.patch.shape[1])]))
    page.locator(f'#heads .thumb[data-h="{head}"]').hover()
    assert page.locator("#now").inner_text().startswith(f"layer {start}, head {head}:")
    by_head = backgrounds(page)
    assert by_head != colours
    assert rgb(by_head[int(maps.patch[start, head].astype(float).argmax())]) == BRIGHTEST
    assert page.locator("#h-image").get_attribute("points") != ""
    page.mouse.move(5, 5)
    assert "mean over heads" in page.locator("#now").inner_text()
    assert backgrounds(page) == colours

    other = (start + 1) % n_layers
    page.locator(f'#layers .thumb >> nth={other}').hover()
    assert page.locator("#now").inner_text().startswith(f"layer {other},")
    assert page.locator(f'#masses tr[data-l="{other}"]').get_attribute("class") == "on"
    assert rgb(backgrounds(page)[int(mean[other].argmax())]) == BRIGHTEST
    page.locator("#layer").fill(str(start))
    assert page.locator("#now").inner_text().startswith(f"layer {start},")
    assert errors == []
    page.close()


def test_anyres_viewer_switches_between_the_base_and_high_res_views(browser, tmp_path):
    model, proc = build("llava_next")
    vlm = VLM(model, proc, "llava_next", name="tiny llava_next")
    torch.manual_seed(0)
    summary = attention.execute(vlm, shapesworld.generate(1, seed=5, size=300),
                                attention.AttentionConfig(viewers=1), tmp_path, {"model": "t"})
    maps = attention.load_maps(attention.maps_path(tmp_path, summary["viewers"][0]["sample"]))
    page, errors = open_page(browser, (tmp_path / "viewer" / "sw-5-0.html").as_uri())
    visible = "els => els.filter(e => getComputedStyle(e).display !== 'none').length"
    assert page.locator("#views button").count() == 2
    assert page.eval_on_selector_all(".patch", visible) == int((maps.tile == 0).sum())
    page.locator('#views button[data-view="1"]').click()
    assert page.eval_on_selector_all(".patch", visible) == int((maps.tile == 1).sum())
    assert page.locator('#views button[data-view="1"]').get_attribute("class") == "on"
    assert errors == []
    page.close()


def test_report_section_renders_with_its_viewer(browser, toy_run, tmp_path):
    summary, _ = toy_run
    path = tmp_path / "report.html"
    path.write_text(render_page("vislens study: test", {"model": "toy"},
                                [attention_section(summary)]))
    html = path.read_text()
    assert "http://" not in html and "https://" not in html and "<script src" not in html
    page, errors = open_page(browser, path.as_uri())
    section = page.locator("section#attention")
    assert section.is_visible()
    assert section.locator("table.result").count() == 2
    assert section.locator("table.result").nth(1).locator("tbody tr").count() == \
        summary["n_layers"]
    widths = page.eval_on_selector_all("section#attention img",
                                       "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 2 and all(w > 100 for w in widths)
    assert "attention_" not in section.locator("figcaption").all_inner_texts()[0]
    frame = page.frame_locator("section#attention iframe").first
    frame.locator('#heads .thumb[data-h="1"]').hover()
    assert ", head 1:" in frame.locator("#now").inner_text()
    assert errors == []
    page.close()
