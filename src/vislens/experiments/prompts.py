"""The question each setting asks about a target object, for any data source.

ShapesWorld scenes use ShapesWorld's own phrasing (the toys' vocabulary);
other data (COCO, ...) gets the English templates of Neo et al.
"""

from __future__ import annotations

from vislens.data import shapesworld
from vislens.data.samples import Question, Sample

GENERATIVE = "Describe this image."
POLLING = "Is there a {name} in this image?"
VQA = "What is the main object in this image?"
VQA_PREFIX = "It is a"


def question(sample: Sample, target: int, setting: str) -> Question:
    """The single question about `target` whose right answer names it (polling: "yes")."""
    if sample.meta.get("source") == "shapesworld":
        asked = shapesworld.questions(sample, setting, target=target)
        if setting == "vqa":
            return next(q for q in asked if q.kind == "vqa-shape")
        return asked[0]  # polling: the positive question; generative: the caption
    name = sample.instances[target].name
    if setting == "generative":
        return Question("generative", GENERATIVE, name, target=target, kind="caption",
                        target_name=name)
    if setting == "polling":
        return Question("polling", POLLING.format(name=name), "yes", target=target,
                        kind="polling-positive", target_name=name)
    if setting == "vqa":
        return Question("vqa", VQA, name, answer_prefix=VQA_PREFIX, target=target,
                        kind="vqa-class", target_name=name)
    raise ValueError(f"unknown setting {setting!r}; choose generative, polling or vqa")


MAX_NEW_TOKENS = {"generative": 40, "polling": 3, "vqa": 4}
