"""The question each setting asks about a target object, and where its answer sits in
the model's tokens, for any data source.

ShapesWorld scenes use ShapesWorld's own phrasing (the toys' vocabulary); other
data (COCO, ...) gets the English prompts of Neo et al., with an object-specific
VQA question that points at the target by where it is, never by its name.
"""

from __future__ import annotations

from collections.abc import Sequence

from vislens.data import shapesworld
from vislens.data.samples import Question, Sample

GENERATIVE = "Describe this image."
POLLING = "Is there a {name} in this image?"
VQA = "What is the object in the {region} of the image?"
VQA_PREFIX = "It is"  # the answer's article is the model's to choose ("a" / "an")
REGIONS = (("top left", "top", "top right"), ("left", "center", "right"),
           ("bottom left", "bottom", "bottom right"))
MAX_NEW_TOKENS = {"generative": 40, "polling": 3, "vqa": 6}


def region(box: Sequence[float], size: tuple[int, int]) -> str:
    """Where a box's centre lies on a 3x3 grid of the image ("top left" ... "center")."""
    w, h = size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return REGIONS[min(2, int(3 * cy / h))][min(2, int(3 * cx / w))]


def question(sample: Sample, target: int, setting: str) -> Question:
    """The single question about `target` whose right answer names it (polling: "yes")."""
    if sample.meta.get("source") == "shapesworld":
        asked = shapesworld.questions(sample, setting, target=target)
        if setting == "vqa":
            return next(q for q in asked if q.kind == "vqa-shape")
        return asked[0]  # polling: the positive question; generative: the caption
    inst = sample.instances[target]
    name = inst.name
    if setting == "generative":
        return Question("generative", GENERATIVE, name, target=target, kind="caption",
                        target_name=name)
    if setting == "polling":
        return Question("polling", POLLING.format(name=name), "yes", target=target,
                        kind="polling-positive", target_name=name)
    if setting == "vqa":
        where = region(inst.box, sample.image.size)
        return Question("vqa", VQA.format(region=where), name, answer_prefix=VQA_PREFIX,
                        target=target, kind="vqa-class", target_name=name)
    raise ValueError(f"unknown setting {setting!r}; choose generative, polling or vqa")


def answer_span(decode, generated: Sequence[int], q: Question) -> tuple[int, int] | None:
    """[start, end) of the answer word in generated token ids, found token by token.

    end: the first token after which the answer is right and stays right to the end
    of the generation (so "cat" followed by "ch" is not taken). start: the latest
    token from which the tokens up to `end` still name the answer on their own, i.e.
    the answer word's first piece ("gir" of "gir|affe", "Yes" of "Yes|,"). None when
    the generation is not correct. `decode(ids) -> str` is the tokenizer's decode.
    """
    ids = list(generated)
    n = len(ids)
    ok = [q.is_correct(decode(ids[:j])) for j in range(n + 1)]
    if not ok[n]:
        return None
    end = n
    while end > 0 and ok[end - 1]:
        end -= 1
    start = max(i for i in range(end) if q.is_correct(decode(ids[i:end])))
    return start, end
