"""Regenerate the docs screenshots from a study report, as a person sees them in Chromium:
python docs/screenshot.py runs/demo/report.html (needs the test extras and Debian's chromium).

report.png: the logit-lens section, one cell hovered. attention_report.png: the attention
section's tables, plots and first viewer, one head hovered. attention_viewer.png: a
standalone attention viewer, the answer's most attended patch hovered."""

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

report = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/report.html").resolve()
docs = Path(__file__).resolve().parent
PEAK = "[...Array(D.N).keys()].filter(inView).reduce((a, i) => " \
    "value(S.layer, S.head, i) > value(S.layer, S.head, a) ? i : a)"
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1200, "height": 1500})
    page.goto(report.as_uri())
    frame = page.frame_locator("section#logit-lens iframe").first
    cell = frame.locator('td[data-t="40"][data-l="3"]')
    page.locator("section#logit-lens").scroll_into_view_if_needed()
    cell.hover()
    page.locator("section#logit-lens").screenshot(path=str(docs / "report.png"))

    section = page.locator("section#attention")
    section.scroll_into_view_if_needed()
    page.frame_locator("section#attention iframe").first.locator(
        '#heads .thumb[data-h="3"]').hover()
    top = section.bounding_box()  # viewport coordinates; the clip wants the page's
    first_viewer = section.locator("figure.viewer").first.bounding_box()
    scrolled = page.evaluate("window.scrollY")
    page.screenshot(path=str(docs / "attention_report.png"), full_page=True, clip={
        "x": top["x"], "y": top["y"] + scrolled, "width": top["width"],
        "height": first_viewer["y"] + first_viewer["height"] - top["y"]})

    viewer = sorted((report.parent / "attention" / "viewer").glob("*.html"))[0]
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(viewer.as_uri())
    page.locator(f"#p{page.evaluate(PEAK)}").hover()
    page.screenshot(path=str(docs / "attention_viewer.png"), full_page=True)
    browser.close()
for name in ("report.png", "attention_report.png", "attention_viewer.png"):
    print(docs / name)
