"""The selection funnel: how many images each step of an experiment kept, per setting.

Every command that selects images (ablate, knockout, logit-lens, attention) reports
the same steps, stored under the summary key `funnel` and printed on the console:

  read           images the loader looked at (COCO: selection runs on the raw
                 annotations before pixels are read, so this can exceed the images used)
  selected       images with a target (vislens.experiments.selection)
  region         VQA only: the question's region word ("top left", ...) singles out the
                 target on the view the model sees (vislens.experiments.prompts.asked)
  clean_correct  the model answers the clean image right
  noise_filter   ablation only: and answers wrong when the object's pixels are noised
  kept           images the experiment's metric is computed on

A step an experiment does not apply is None. When a setting keeps nothing, one line
says at which step its images were lost and which option changes that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

STEPS = ("read", "selected", "region", "clean_correct", "noise_filter", "kept")
LABELS = {
    "read": "read",
    "selected": "passed the selection",
    "region": "had a VQA question naming only the target",
    "clean_correct": "answered right clean",
    "noise_filter": "answered wrong with the object noised",
    "kept": "kept",
    # patch's own steps (experiments/patching.py FUNNEL_STEPS)
    "paired": "had a clean / corrupted pair and a question naming only the target",
    "corrupt_wrong": "answered wrong corrupted",
}
LOST = {
    "selected": ("no image has a target alone in its class in the area range",
                 "widen the range with --area MIN:MAX or read more images with --n"),
    "region": ("the VQA question's region word ('top left', ...) would also name another "
               "object in every image", "read more images with --n, or leave vqa out of "
                                        "--settings"),
    "clean_correct": ("the model answers none of them right on the clean image",
                      "try other images (--data, --n) or another --model"),
    "noise_filter": ("the model still answers right with the object's pixels noised (the "
                     "context gives the answer away), so the noise filter dropped them",
                     "read more images with --n or use other --data"),
    "kept": ("nothing was kept", "read more images with --n"),
}
SKIPPED_REGION = "region"  # a clean row's `skipped` value: VQA region word not unambiguous


class Funnel(TypedDict):
    """The summary key `funnel` (`tally`); the report prints it as a table and its `lost`
    lines as notes."""

    steps: list[str]  # STEPS, in order
    counts: dict[str, dict[str, int | None]]  # setting -> step -> images left (None: n/a)
    lost: dict[str, str]  # setting -> where it lost every image and what to change


def images_read(samples: Sequence) -> int:
    """What the loader read: a vislens.data.samples.SampleList says, else every sample."""
    return int(getattr(samples, "read", len(samples)))


def tally(samples: Sequence, targets: Sequence, rows: list[dict] | None,
          settings: Sequence[str], noise: bool = False) -> Funnel:
    """The funnel of one run. `rows`: the experiment's rows; its clean rows (condition
    "clean") carry `correct`, `kept` and, when the region step dropped them, `skipped`;
    None for an experiment that keeps every selected image (no clean-answer check).
    noise: the experiment applies the noise filter."""
    read, selected = images_read(samples), sum(t is not None for t in targets)
    counts: dict[str, dict] = {}
    for setting in settings:
        step = dict.fromkeys(STEPS)
        step.update(read=read, selected=selected)
        if rows is None:
            step["kept"] = selected
        else:
            clean = [r for r in rows if r["setting"] == setting and r["condition"] == "clean"]
            asked = [r for r in clean if r.get("skipped") != SKIPPED_REGION]
            if setting == "vqa":
                step["region"] = len(asked)
            step["clean_correct"] = sum(bool(r["correct"]) for r in asked)
            if noise:
                step["noise_filter"] = sum(bool(r["kept"]) for r in asked)
            step["kept"] = sum(bool(r["kept"]) for r in asked)
        counts[setting] = step
    lost = {s: line for s, c in counts.items() if (line := lost_line(s, c)) is not None}
    return {"steps": list(STEPS), "counts": counts, "lost": lost}


def lost_line(setting: str, counts: dict) -> str | None:
    """One line naming where a setting lost all its images and what changes it (None when it
    kept some)."""
    if counts.get("kept"):
        return None
    applied = [s for s in STEPS if counts.get(s) is not None]
    where = next((s for s in applied[1:] if counts[s] == 0), "kept")
    before = applied[applied.index(where) - 1] if where in applied[1:] else "read"
    why, fix = LOST[where]
    return (f"{setting}: no image kept; the {counts.get(before) or 0} that "
            f"{_past(before)} were lost at the step '{LABELS[where]}': {why}; {fix}")


def _past(step: str) -> str:
    return "were read" if step == "read" else LABELS[step]


def path(counts: dict) -> str:
    """The counts as 'N read -> N passed the selection -> ...', steps not applied left out."""
    return " -> ".join(f"{counts[s]} {LABELS.get(s, s)}" for s in counts
                       if counts.get(s) is not None)


def lines(funnel: dict | None) -> list[str]:
    """The console lines of a funnel: one per setting, then one per setting that kept
    nothing."""
    if not funnel:
        return []
    out = [f"images, {setting}: {path(c)}" for setting, c in funnel["counts"].items()]
    return out + list(funnel.get("lost", {}).values())
