"""ShapesWorld versions of the perception tasks of Liu et al. (part B), with exact truth.

Each function returns the task's record type (see samples.py) built from
seeded scenes, so every task runs offline and any item can be regenerated.
The class of an object in the segmentation tasks is its shape by default
(unique within a scene, like a COCO category); `by="color"` uses its color.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vislens.data._io import mask_box
from vislens.data.samples import (
    CorrespondencePair,
    CoSegmentationSet,
    FewShotEpisode,
    MultipleChoice,
    ReferringExpression,
    Sample,
    SemanticMap,
    Video,
)
from vislens.data.scenes import FILLS, ObjectSpec, render
from vislens.data.shapesworld import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_SIZE,
    HELD_OUT_SEED,
    SHAPES,
    make_scene,
)

BY = ("shape", "color")
RELATIONS = {  # phrase -> does box a stand in that relation to box b (strictly, no overlap)
    "left of": lambda a, b: a[2] <= b[0],
    "right of": lambda a, b: a[0] >= b[2],
    "above": lambda a, b: a[3] <= b[1],
    "below": lambda a, b: a[1] >= b[3],
}
LETTERS = "ABCDEFGH"
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def classes(by: str = "shape") -> list[str]:
    """Class names of the segmentation tasks, without the background."""
    _check_by(by)
    return list(SHAPES) if by == "shape" else list(COLORS)


def foreground(sample: Sample, name: str, by: str = "shape") -> np.ndarray:
    """Union of the masks of instances whose `by` attribute is `name`."""
    mask = np.zeros((sample.image.height, sample.image.width), dtype=bool)
    for inst in sample.instances:
        if inst.attributes.get(by) == name:
            mask |= inst.mask
    return mask


def few_shot_episodes(n: int, seed: int = HELD_OUT_SEED, shots: int = 5, queries: int = 1,
                      by: str = "shape") -> list[FewShotEpisode]:
    """Pascal-5i style episodes; classes cycle so they are balanced; no image repeats
    within an episode (support and query are disjoint)."""
    _check_n(n)
    names = classes(by)
    pools = _ClassPools(seed, by)
    episodes = []
    for e in range(n):
        name = names[e % len(names)]
        picked = pools.take(name, shots + queries)
        masks = [foreground(s, name, by) for s in picked]
        episodes.append(FewShotEpisode(name, picked[:shots], masks[:shots],
                                       picked[shots:], masks[shots:]))
    return episodes


def cosegmentation_sets(n: int, seed: int = HELD_OUT_SEED, size: int = 4,
                        by: str = "shape") -> list[CoSegmentationSet]:
    """MSRC style sets: `size` images that all contain one class (plus other objects)."""
    _check_n(n)
    names = classes(by)
    pools = _ClassPools(seed, by)
    sets = []
    for e in range(n):
        name = names[e % len(names)]
        picked = pools.take(name, size)
        sets.append(CoSegmentationSet(name, picked, [foreground(s, name, by) for s in picked]))
    return sets


def semantic_maps(n: int, seed: int = HELD_OUT_SEED, by: str = "shape") -> list[SemanticMap]:
    """ImageNet-S style per-pixel class ids; classes[0] = "background"."""
    _check_n(n)
    names = ["background", *classes(by)]
    out = []
    for i in range(n):
        s = make_scene(seed, i)
        labels = np.zeros((s.image.height, s.image.width), dtype=np.int32)
        for inst in s.instances:
            labels[inst.mask] = names.index(inst.attributes[by])
        out.append(SemanticMap(sample=s, classes=names, labels=labels))
    return out


def referring_expressions(n: int, seed: int = HELD_OUT_SEED) -> list[ReferringExpression]:
    """RefCOCO style expressions, each naming exactly one object of its scene.

    Kinds: "shape" ("the circle"), "color" ("the red shape"), "color-shape",
    "relation" ("the shape left of the square": the target is the only object
    in that relation, by box, to the named one) and "color-relation" ("the red
    shape left of the square"). Relations are preferred when a scene has one.
    """
    _check_n(n)
    out: list[ReferringExpression] = []
    index = 0
    while len(out) < n:
        s = make_scene(seed, index)
        rng = np.random.default_rng([seed, index, 31])
        index += 1
        for t in range(len(s.instances)):
            if len(out) == n:
                break
            kind, text = _expression(s, t, rng)
            out.append(ReferringExpression(id=f"{s.id}-ref{t}", sample=s, expression=text,
                                           target=t, kind=kind))
    return out


def _expression(s: Sample, t: int, rng: np.random.Generator) -> tuple[str, str]:
    inst = s.instances[t]
    shape, color = inst.attributes["shape"], inst.attributes["color"]
    relations = []
    for phrase, rel in RELATIONS.items():
        for j, other in enumerate(s.instances):
            if j == t or not rel(inst.box, other.box):
                continue
            holders = [k for k, a in enumerate(s.instances) if k != j and rel(a.box, other.box)]
            if holders == [t]:
                relations.append((phrase, other.attributes["shape"]))
    if relations and rng.random() < 0.7:
        phrase, other_shape = relations[int(rng.integers(len(relations)))]
        if rng.random() < 0.5:
            return "relation", f"the shape {phrase} the {other_shape}"
        return "color-relation", f"the {color} shape {phrase} the {other_shape}"
    kind = ("shape", "color", "color-shape")[int(rng.integers(3))]
    text = {"shape": f"the {shape}", "color": f"the {color} shape",
            "color-shape": f"the {color} {shape}"}[kind]
    return kind, text


def correspondence_pairs(n: int, seed: int = HELD_OUT_SEED, size: int = DEFAULT_SIZE,
                         scale: tuple[float, float] = (0.7, 1.4)) -> list[CorrespondencePair]:
    """SPair style pairs: one object moved, rescaled and recolored, plus a distractor.

    Keypoints are the object's center and vertices, mapped exactly
    (p' = c' + s (p - c)); only points inside both images are kept.
    """
    _check_n(n)
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 41])
        shape_i, other_i = rng.choice(len(SHAPES), 2, replace=False)
        c_src, c_trg, c_other = rng.choice(list(COLORS), 3, replace=False)
        extent = float(rng.uniform(22, 32))
        s = float(rng.uniform(*scale))
        angle = float(rng.uniform(-0.3, 0.3))
        objs = []
        for color, ext in ((c_src, extent), (c_trg, extent * s)):
            main = _place(rng, SHAPES[shape_i], str(color), ext, angle, size, [])
            other = _place(rng, SHAPES[other_i], str(c_other), float(rng.uniform(16, 26)),
                           0.0, size, [main])
            objs.append((main, other))
        bg = [BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))] for _ in range(2)]
        src = render(list(objs[0]), f"corr-{seed}-{i}-src", size, bg[0])
        trg = render(list(objs[1]), f"corr-{seed}-{i}-trg", size, bg[1])
        p_src, p_trg = objs[0][0].keypoints(), objs[1][0].keypoints()
        inside = _inside(p_src, size) & _inside(p_trg, size)
        pairs.append(CorrespondencePair(
            id=f"corr-{seed}-{i}", source=src, target=trg,
            source_points=p_src[inside], target_points=p_trg[inside],
            source_box=tuple(float(v) for v in src.instances[0].box),
            target_box=tuple(float(v) for v in trg.instances[0].box),
            category=SHAPES[shape_i],
            meta={"scale": s, "keypoint_ids": np.flatnonzero(inside).tolist(),
                  "translation": [objs[1][0].cx - objs[0][0].cx, objs[1][0].cy - objs[0][0].cy]},
        ))
    return pairs


def videos(n: int, seed: int = HELD_OUT_SEED, frames: int = 8, size: int = DEFAULT_SIZE,
           objects: tuple[int, int] = (1, 3), speed: float = 4.0) -> list[Video]:
    """DAVIS style clips: objects move at constant velocity, bounce off the borders and
    may occlude each other (masks are the visible pixels; later objects are in front)."""
    _check_n(n)
    if frames < 2:
        raise ValueError(f"a video needs at least 2 frames, got {frames}")
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 53])
        k = int(rng.integers(objects[0], objects[1] + 1))
        shapes = rng.choice(SHAPES, k, replace=False)
        colors = rng.choice(list(COLORS), k, replace=False)
        state = []
        for shape, color in zip(shapes, colors, strict=True):
            ext = float(rng.uniform(16, 28))
            m = ext / 2 + 2
            pos = rng.uniform(m, size - m, 2)
            vel = rng.uniform(-speed, speed, 2)
            state.append([str(shape), str(color), ext, pos, vel])
        bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        clip = []
        for t in range(frames):
            specs = [ObjectSpec(sh, co, float(p[0]), float(p[1]), ext)
                     for sh, co, ext, p, _ in state]
            clip.append(render(specs, f"vid-{seed}-{i}-{t:05d}", size, bg,
                               meta={"video": f"vid-{seed}-{i}", "frame": t}))
            for obj in state:
                ext, pos, vel = obj[2], obj[3], obj[4]
                pos += vel
                m = ext / 2 + 2
                for d in range(2):  # bounce: reflect the position and the velocity
                    if pos[d] < m:
                        pos[d], vel[d] = 2 * m - pos[d], -vel[d]
                    elif pos[d] > size - m:
                        pos[d], vel[d] = 2 * (size - m) - pos[d], -vel[d]
        out.append(Video(id=f"vid-{seed}-{i}", frames=clip, meta={"seed": seed, "index": i}))
    return out


def multiple_choice(n: int, seed: int = HELD_OUT_SEED, kind: str = "shape", n_choices: int = 2,
                    size: int = DEFAULT_SIZE) -> list[MultipleChoice]:
    """BLINK style: image_1 is a reference, the others are candidates; exactly one
    candidate shares the reference's `kind` ("shape", "color" or "fill") while all its
    other attributes differ; the wrong candidates share everything BUT `kind` with
    the reference, so only the asked attribute decides."""
    _check_n(n)
    values = {"shape": list(SHAPES), "color": list(COLORS), "fill": list(FILLS)}
    if kind not in values:
        raise ValueError(f"unknown multiple-choice kind {kind!r}; choose shape, color or fill")
    if not 2 <= n_choices <= min(len(values["fill"]), len(ORDINALS) - 1):
        raise ValueError(f"n_choices must be 2 or 3 (fill styles limit it), got {n_choices}")
    label = {"shape": "shape", "color": "color", "fill": "fill style"}[kind]
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 67])
        ref = {a: str(rng.choice(v)) for a, v in values.items()}
        answer = int(rng.integers(n_choices))
        wrong = iter(rng.permutation([v for v in values[kind] if v != ref[kind]]))
        images, attrs = [], [ref]
        for c in range(n_choices):
            if c == answer:
                cand = {a: (ref[a] if a == kind else str(rng.choice(
                    [v for v in values[a] if v != ref[a]]))) for a in values}
            else:
                cand = dict(ref, **{kind: str(next(wrong))})
            attrs.append(cand)
        for a in attrs:
            obj = _place(rng, a["shape"], a["color"], float(rng.uniform(30, 40)),
                         float(rng.uniform(-0.3, 0.3)), size, [])
            obj.fill = a["fill"]
            bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
            images.append(render([obj], f"mc-{seed}-{i}-{len(images)}", size, bg).image)
        out.append(MultipleChoice(
            id=f"mc-{kind}-{seed}-{i}",
            question=f"Which image shows the same {label} as the reference image "
                     f"(the first image)?",
            images=images, choices=[f"the {ORDINALS[c + 1]} image" for c in range(n_choices)],
            answer=f"({LETTERS[answer]})",
            meta={"kind": kind, "attributes": attrs},
        ))
    return out


class _ClassPools:
    """Scenes of world `seed` in index order, handed out per class, each at most once
    per class, so episodes are deterministic and never repeat an image of their class."""

    def __init__(self, seed: int, by: str):
        self.seed, self.by = seed, by
        self.next_index = 0
        self.pools: dict[str, list[Sample]] = {}

    def _scenes(self) -> Iterator[Sample]:
        while True:
            s = make_scene(self.seed, self.next_index)
            self.next_index += 1
            yield s

    def take(self, name: str, k: int) -> list[Sample]:
        pool = self.pools.setdefault(name, [])
        scenes = self._scenes()
        while len(pool) < k:
            s = next(scenes)
            for inst in s.instances:
                self.pools.setdefault(inst.attributes[self.by], []).append(s)
        taken, self.pools[name] = pool[:k], pool[k:]
        return taken


def _place(rng: np.random.Generator, shape: str, color: str, extent: float, angle: float,
           size: int, avoid: list[ObjectSpec]) -> ObjectSpec:
    """An object at a random position that keeps 3 px clear of the `avoid` objects."""
    taken = np.zeros((size, size), dtype=bool)
    for other in avoid:
        x0, y0, x1, y1 = mask_box(other.mask(size))
        taken[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3] = True
    m = extent * 0.6 + 1
    for _ in range(200):
        cx, cy = rng.uniform(m, size - m, 2)
        obj = ObjectSpec(shape, color, float(cx), float(cy), extent, angle)
        if not (obj.mask(size) & taken).any():
            return obj
    raise ValueError(f"no room for a {extent:.0f} px {shape} in a {size} px image; "
                     "use a larger size")


def _inside(points: np.ndarray, size: int) -> np.ndarray:
    return np.all((points >= 0) & (points <= size - 1), axis=1)


def _check_by(by: str) -> None:
    if by not in BY:
        raise ValueError(f"unknown class attribute {by!r}; choose shape or color")


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"need at least one item, got n={n}")


def episodes_from_maps(maps: list[SemanticMap], n: int, seed: int = 0, shots: int = 5,
                       queries: int = 1, fold: int | None = None, folds: int = 4
                       ) -> list[FewShotEpisode]:
    """Pascal-5i style episodes from real semantic maps (e.g. `load_voc`).

    With `fold` f, only the f-th block of len(classes-1)/folds classes is used (the
    Pascal-5i test split of fold f). Classes cycle in id order; images are drawn
    without replacement inside an episode with a generator seeded by (seed, e).
    Masks are the class's pixels; ignore pixels count as background here, and
    each record's sample keeps the map's labels in meta["labels"] for scoring.
    """
    _check_n(n)
    by_class: dict[str, list[SemanticMap]] = {}
    for sm in maps:
        for name in sm.present():
            by_class.setdefault(name, []).append(sm)
    names = list(maps[0].classes[1:]) if maps else []
    if fold is not None:
        per = len(names) // folds
        if not 0 <= fold < folds:
            raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
        names = names[fold * per:(fold + 1) * per]
    names = [c for c in names if len(by_class.get(c, [])) >= shots + queries]
    if not names:
        raise ValueError(f"no class has {shots + queries} images; use fewer shots or more data")
    episodes = []
    for e in range(n):
        name = names[e % len(names)]
        rng = np.random.default_rng([seed, e, 71])
        pool = by_class[name]
        picked = [pool[int(i)] for i in rng.choice(len(pool), shots + queries, replace=False)]
        samples = [_with_labels(sm) for sm in picked]
        masks = [sm.mask(name) for sm in picked]
        episodes.append(FewShotEpisode(name, samples[:shots], masks[:shots],
                                       samples[shots:], masks[shots:]))
    return episodes


def cosegmentation_from_maps(maps: list[SemanticMap], n: int, seed: int = 0,
                             size: int = 4) -> list[CoSegmentationSet]:
    """Co-segmentation sets from real semantic maps: `size` images sharing a class."""
    eps = episodes_from_maps(maps, n, seed=seed, shots=size, queries=0)
    return [CoSegmentationSet(e.name, e.support, e.support_masks) for e in eps]


def _with_labels(sm: SemanticMap) -> Sample:
    sm.sample.meta.setdefault("labels", sm.labels)
    sm.sample.meta.setdefault("ignore_index", sm.ignore_index)
    return sm.sample
