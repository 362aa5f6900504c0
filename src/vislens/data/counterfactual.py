"""Exact counterfactual scenes for causal tracing: one object's colour or shape changed.

Activation patching asks how much of the clean answer comes back when one activation of
the clean run is put into a corrupted run. Noise on the object's pixels (Neo et al.'s
corruption) leaves the corrupted answer open; a counterfactual scene fixes it to one known
word, so the metric is the logit difference between two words the model knows. ShapesWorld
redraws the very same scene with the target's colour (same mask) or shape (same centre,
size and angle) changed: every other pixel and every other mask is identical, checked
here against the sample itself rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vislens.data import shapesworld as sw
from vislens.data.samples import Question, Sample

ATTRIBUTES = ("color", "shape")


@dataclass(frozen=True)
class Counterfactual:
    """A clean scene, the same scene with its target changed, and the question whose
    answer flips from `question.answer` (clean) to `foil` (counterfactual)."""

    clean: Sample
    changed: Sample
    target: int
    attribute: str
    question: Question
    foil: str

    def object_mask(self) -> np.ndarray:
        """The pixels the two scenes' targets cover: where the images differ."""
        return self.clean.instances[self.target].mask | self.changed.instances[self.target].mask


def question_for(sample: Sample, target: int, attribute: str) -> Question:
    """The VQA question whose answer is the target's `attribute`, naming it by the other."""
    inst = sample.instances[target]
    if attribute == "color":
        return Question("vqa", sw.VQA_COLOR_PROMPT.format(shape=inst.attributes["shape"]),
                        inst.attributes["color"], answer_prefix=sw.VQA_COLOR_PREFIX,
                        target=target, kind="vqa-color", target_name=inst.name)
    if attribute == "shape":
        return Question("vqa", sw.VQA_SHAPE_PROMPT.format(color=inst.attributes["color"]),
                        inst.attributes["shape"], answer_prefix=sw.VQA_SHAPE_PREFIX,
                        target=target, kind="vqa-shape", target_name=inst.name)
    raise ValueError(f"unknown counterfactual attribute {attribute!r}; choose "
                     f"{' or '.join(ATTRIBUTES)}")


def counterfactual(sample: Sample, target: int, attribute: str,
                   value: str | None = None) -> Counterfactual | None:
    """`sample` redrawn with instance `target`'s `attribute` set to `value` (by default one
    no object of the scene has, chosen from the scene's seed). None when the new shape would
    touch another object: the scene would no longer be the same scene around it."""
    if sample.meta.get("source") != "shapesworld" or "seed" not in sample.meta:
        raise ValueError(f"sample {sample.id!r} is not a ShapesWorld scene; exact "
                         "counterfactuals exist only for shapesworld data (use --corrupt noise)")
    question = question_for(sample, target, attribute)
    seed, index, size = sample.meta["seed"], sample.meta["index"], sample.image.size[0]
    taken = {inst.attributes[attribute] for inst in sample.instances}
    choices = [v for v in (sw.COLORS if attribute == "color" else sw.SHAPES) if v not in taken]
    if value is None:
        rng = np.random.default_rng([seed, index, 11, target])
        value = choices[int(rng.integers(len(choices)))]
    elif value not in choices:
        raise ValueError(f"{attribute} {value!r} is already in scene {sample.id!r} or unknown; "
                         f"choose one of {', '.join(choices)}")
    redrawn = sw.make_scene(seed, index, size=size, n_objects=_n_objects(sample))
    if not np.array_equal(np.asarray(redrawn.image), np.asarray(sample.image)):
        raise ValueError(f"scene {sample.id!r} could not be redrawn identically; build it with "
                         "shapesworld.generate / make_scene and the default object counts")
    changed = sw.make_scene(seed, index, size=size, n_objects=_n_objects(sample),
                            change={target: {attribute: value}})
    new = changed.instances[target].mask
    others = [inst.mask for i, inst in enumerate(sample.instances) if i != target]
    if any((_grown(new) & m).any() for m in others) or not new.any():
        return None
    changed.id = f"{sample.id}-{attribute}-{value}"
    changed.meta = {**sample.meta, "counterfactual": {"target": target, "attribute": attribute,
                                                      "from": question.answer, "to": value}}
    return Counterfactual(clean=sample, changed=changed, target=target, attribute=attribute,
                          question=question, foil=value)


def _n_objects(sample: Sample) -> tuple[int, int]:
    return tuple(sample.meta.get("n_objects", (1, 4)))


def _grown(mask: np.ndarray) -> np.ndarray:
    """The mask and its 1-pixel ring: objects of a scene never touch."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out
