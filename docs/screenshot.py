"""Regenerate docs/report.png from a study report, as a person sees it in Chromium:
python docs/screenshot.py runs/demo/report.html (needs the test extras and Debian's chromium)."""

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

report = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/report.html").resolve()
out = Path(__file__).resolve().parent / "report.png"
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1200, "height": 1500})
    page.goto(report.as_uri())
    frame = page.frame_locator("section#logit-lens iframe").first
    cell = frame.locator('td[data-t="40"][data-l="3"]')
    page.locator("section#logit-lens").scroll_into_view_if_needed()
    cell.hover()
    page.locator("section#logit-lens").screenshot(path=str(out))
    browser.close()
print(out)
