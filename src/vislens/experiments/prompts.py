"""The question each setting asks about a target object, and where its answer sits in
the model's tokens, for any data source.

ShapesWorld scenes use ShapesWorld's own phrasing (the toys' vocabulary); other
data (COCO, ...) gets the English prompts of Neo et al., with an object-specific
VQA question that points at the target by where it is, never by its name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vislens.data import shapesworld
from vislens.data.samples import Question, Sample

GENERATIVE = "Describe this image."
POLLING = "Is there a {name} in this image?"
VQA = "What is the object in the {region} of the image?"
VQA_PREFIX = "It is"  # the answer's article is the model's to choose ("a" / "an")
REGIONS = (("top left", "top", "top right"), ("left", "center", "right"),
           ("bottom left", "bottom", "bottom right"))
MAX_NEW_TOKENS = {"generative": 40, "polling": 3, "vqa": 6}


def region(box: Sequence[float], size: tuple[int, int],
           view: Sequence[float] | None = None) -> str:
    """Where a box's centre lies on a 3x3 grid ("top left" ... "center") of the view the
    model sees: `view` = (x0, y0, x1, y1) in original pixels (default: the whole image of
    `size`)."""
    x0, y0, x1, y1 = view if view is not None else (0, 0, *size)
    cx, cy = (box[0] + box[2]) / 2 - x0, (box[1] + box[3]) / 2 - y0
    w, h = x1 - x0, y1 - y0
    return REGIONS[min(2, max(0, int(3 * cy / h)))][min(2, max(0, int(3 * cx / w)))]


def visible_view(token_map, size: tuple[int, int], sample: int = 0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the part of the original image the model's image tokens see (the
    union of their boxes, within the image). LLaVA-1.5 centre-crops a non-square image to
    its middle square; a family without a token layout counts as seeing it all."""
    w, h = size
    if not getattr(token_map, "geometric", False):
        return 0, 0, w, h
    boxes = token_map.boxes(token_map.image_positions(sample), sample)
    if not len(boxes):
        return 0, 0, w, h
    x0, y0 = max(0.0, float(boxes[:, 0].min())), max(0.0, float(boxes[:, 1].min()))
    x1, y1 = min(float(w), float(boxes[:, 2].max())), min(float(h), float(boxes[:, 3].max()))
    return (int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5)),
            int(np.ceil(x1 - 0.5)), int(np.ceil(y1 - 0.5)))


def seen_box(mask: np.ndarray, view: Sequence[int]) -> tuple[int, int, int, int] | None:
    """The box of the part of `mask` inside `view` (None when none of it is seen)."""
    x0, y0, x1, y1 = (int(v) for v in view)
    ys, xs = np.nonzero(mask[y0:y1, x0:x1])
    if not len(xs):
        return None
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def singles_out(sample: Sample, target: int, view: Sequence[int]) -> str | None:
    """The target's region word on the view, or None when it would not single the target
    out: the target is not seen, or another object's seen centre lies in the same region."""
    box = seen_box(sample.instances[target].mask, view)
    if box is None:
        return None
    where = region(box, sample.image.size, view)
    for i, other in enumerate(sample.instances):
        if i == target:
            continue
        obox = seen_box(other.mask, view)
        if obox is not None and region(obox, sample.image.size, view) == where:
            return None
    return where


def asked(vlm, sample: Sample, target: int, setting: str) -> Question | None:
    """`question` as put to this model: the VQA region word is computed on the view the
    model sees (its image tokens' boxes); None when that word would not single out the
    target, so the image is not used for VQA (a step of the selection funnel)."""
    if setting != "vqa" or sample.meta.get("source") == "shapesworld":
        return question(sample, target, setting)
    probe = vlm.prepare([sample.image], [VQA.format(region="center")], [VQA_PREFIX])
    view = visible_view(probe.token_map, sample.image.size)
    if singles_out(sample, target, view) is None:
        return None
    return question(sample, target, setting, view=view)


def question(sample: Sample, target: int, setting: str,
             view: Sequence[int] | None = None) -> Question:
    """The single question about `target` whose right answer names it (polling: "yes").
    view: what the model sees of the image (`visible_view`; default all of it), where the
    VQA question's region word is computed."""
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
        seen = inst.box if view is None else (seen_box(inst.mask, view) or inst.box)
        where = region(seen, sample.image.size, view)
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
