"""The study report as a person sees it: headless Chromium opens it from disk."""

from pathlib import Path

import pytest
import torch

from vislens.data import shapesworld
from vislens.experiments import logit_lens
from vislens.models.vlm import VLM
from vislens.render.page import render_page
from vislens.render.plots import grouped_bars, heatmap
from vislens.report.sections import (
    ablation_section,
    accuracy_section,
    knockout_section,
    logit_lens_section,
)
from vislens.toy.build import build_model, build_processor


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report with every part-A section; the viewer comes from a real logit-lens run."""
    tmp = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    vlm = VLM(build_model().eval(), build_processor(), "llava", name="toy (untrained)")
    lens = logit_lens.execute(vlm, shapesworld.generate(2, seed=3), logit_lens.LensConfig(
        viewers=1, area=None), tmp / "lens", {"model": "toy (untrained)"})
    drop = {"polling": {"object": 40.0, "object+1": 70.0, "random-40": 5.0}}
    ci = {"polling": {k: [v - 10, v + 10] for k, v in drop["polling"].items()}}
    ablation = {"drop": drop, "ci95": ci, "n_kept": {"polling": 20},
                "paper": {"polling": {"object": 15, "object+1": 51}},
                "plot": str(grouped_bars(drop, tmp / "a.png", "ablation", "%", ci))}
    rel = {"object->last": [1.0, 0.5, 0.2], "object+1->last-row": [1.0, 1.0, 0.9]}
    knock = {"window_labels": ["0-1", "2-3", "all"], "relative_accuracy": rel,
             "prob_change": {k: [0.0, -0.2, -0.5] for k in rel}, "n_kept": {"polling": 20},
             "plot": str(heatmap(list(rel.values()), list(rel), ["0-1", "2-3", "all"],
                                 tmp / "k.png", "knockout", "rel"))}
    sections = [accuracy_section({"accuracy": {"polling": 0.97}, "n": 10, "seed": 1}),
                ablation_section(ablation), logit_lens_section(lens), knockout_section(knock)]
    path = tmp / "report.html"
    path.write_text(render_page("vislens study: test", {"model": "toy"}, sections))
    return path


def test_report_is_self_contained(report):
    html = report.read_text()
    assert "http://" not in html and "https://" not in html
    assert "<script src" not in html and "<link" not in html


@pytest.mark.browser
@pytest.mark.slow  # Chromium starts for it
def test_report_renders_in_chromium(report, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(report.as_uri())
    for key in ("accuracy", "ablation", "logit-lens", "knockout"):
        assert page.locator(f"section#{key}").is_visible(), key
        assert page.locator(f"section#{key} table.result").count() >= 1, key
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 3 and all(w > 100 for w in widths)
    frame = page.frame_locator("section#logit-lens iframe").first
    cell = frame.locator('td[data-t="17"][data-l="2"]')
    cell.scroll_into_view_if_needed()
    assert "hl" not in (frame.locator("#p17").get_attribute("class") or "")
    cell.hover()
    assert "hl" in frame.locator("#p17").get_attribute("class")
    assert "layer 2" in frame.locator("#detail").inner_text()
    frame.locator("#filter").fill("describe")
    assert "cells" in frame.locator("#count").inner_text()
    page.screenshot(path=str(report.parent / "report.png"), full_page=True)
    page.close()
    assert (report.parent / "report.png").stat().st_size > 10_000
