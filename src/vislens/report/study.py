"""The study's report.html: one section per step's summary, and what each step took."""

from __future__ import annotations

from pathlib import Path

from vislens.experiments.study import StudyRun
from vislens.render.html import write_page
from vislens.render.page import Section, render_page
from vislens.report.sections import (
    ablation_section,
    accuracy_section,
    artifacts_section,
    attention_section,
    knockout_section,
    logit_lens_section,
    patch_section,
    perceive_section,
    prefix_section,
    surface_section,
    timing_section,
)


def write_study_report(run: StudyRun, out: Path) -> dict:
    """Write `out`/report.html from the study's summaries; returns what `vislens study`
    prints: the page's path, the seconds per step, the sections, each step's headline."""
    summaries = run.summaries
    sections: list[Section] = [
        accuracy_section(summaries["accuracy"]),
        ablation_section(summaries["ablation"]),
        logit_lens_section(summaries["logit lens"]),
        knockout_section(summaries["knockout"]),
        patch_section(summaries["patch"]),
        attention_section(summaries["attention"]),
        perceive_section(summaries["perceive"]),
        artifacts_section(summaries["artifacts"]),
        prefix_section(summaries["prefix"]),
        surface_section(summaries["surface"]),
        timing_section(run.seconds),
    ]
    page = render_page(f"vislens study: {run.model}", run.facts, sections)
    report = write_page(Path(out) / "report.html", page)
    return {"report": str(report), "seconds": run.seconds, "sections": [s.key for s in sections],
            "summaries": run.headlines()}
