"""ShapesWorld's promises: determinism, exact masks, balanced polling, right answers."""

from __future__ import annotations

import numpy as np
import pytest

from vislens.data import shapesworld as sw
from vislens.data.samples import Question

N = 40


@pytest.fixture(scope="module")
def scenes():
    return sw.generate(N, seed=3)


def _pixels(sample):
    return np.asarray(sample.image)


def _questions(sample, setting):
    return sw.questions(sample, setting)


def test_same_seed_is_identical(scenes):
    again = sw.generate(N, seed=3)
    for a, b in zip(scenes, again, strict=True):
        assert a.id == b.id
        assert np.array_equal(_pixels(a), _pixels(b))
        assert [i.name for i in a.instances] == [i.name for i in b.instances]
        for ia, ib in zip(a.instances, b.instances, strict=True):
            assert np.array_equal(ia.mask, ib.mask)
            assert ia.box == ib.box
        for setting in ("generative", "polling", "vqa"):
            assert _questions(a, setting) == _questions(b, setting)


def test_any_scene_regenerates_alone(scenes):
    alone = sw.make_scene(3, 17)
    assert np.array_equal(_pixels(alone), _pixels(scenes[17]))
    tail = sw.generate(3, seed=3, start=10)
    assert [s.id for s in tail] == [scenes[i].id for i in (10, 11, 12)]


def test_different_seeds_differ(scenes):
    other = sw.generate(N, seed=4)
    same = sum(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(scenes, other, strict=True))
    assert same == 0
    assert [s.instances[0].name for s in scenes] != [s.instances[0].name for s in other]


def test_scenes_have_one_to_four_objects_with_unique_shapes_and_colors(scenes):
    counts = set()
    for s in scenes:
        assert 1 <= len(s.instances) <= 4
        counts.add(len(s.instances))
        shapes = [i.attributes["shape"] for i in s.instances]
        colors = [i.attributes["color"] for i in s.instances]
        assert len(set(shapes)) == len(shapes)
        assert len(set(colors)) == len(colors)
        for inst in s.instances:
            assert inst.name == f"{inst.attributes['color']} {inst.attributes['shape']}"
            assert inst.attributes["shape"] in sw.SHAPES
            assert inst.attributes["color"] in sw.COLORS
    assert len(counts) >= 3  # the generator really varies the object count


def test_masks_are_exact(scenes):
    for s in scenes:
        px = _pixels(s).astype(int)
        h, w = px.shape[:2]
        assert s.image.size == (w, h) == (sw.DEFAULT_SIZE, sw.DEFAULT_SIZE)
        union = np.zeros((h, w), dtype=int)
        for inst in s.instances:
            m = inst.mask
            assert m.dtype == bool and m.shape == (h, w)
            assert inst.area > 20
            union += m
            colors = np.unique(px[m], axis=0)
            assert len(colors) == 1, "an object is painted in one exact color"
            color = colors[0]
            # the painted color is the named color up to the generator's jitter
            assert np.abs(color - np.array(sw.COLORS[inst.attributes["color"]])).max() <= 12
            off = np.all(px[~m] == color, axis=-1)
            assert not off.any(), "no pixel outside the mask has the object's color"
            ys, xs = np.nonzero(m)
            assert inst.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert union.max() <= 1, "objects never overlap"


def test_background_is_far_from_every_object_color(scenes):
    for s in scenes:
        px = _pixels(s).astype(int)
        bg = np.ones(px.shape[:2], dtype=bool)
        for inst in s.instances:
            bg &= ~inst.mask
        for inst in s.instances:
            color = px[inst.mask][0]
            assert np.abs(px[bg] - color).max(axis=-1).min() > 30


def test_polling_is_balanced_and_negatives_are_absent(scenes):
    kinds = set()
    for s in scenes:
        qs = _questions(s, "polling")
        assert [q.answer for q in qs] == ["yes", "no"]
        present = {i.name for i in s.instances}
        pos, neg = qs
        assert pos.target_name in present
        assert pos.target_name == s.instances[pos.target].name
        assert neg.target_name not in present
        assert neg.prompt == sw.POLLING_PROMPT.format(name=neg.target_name)
        # the negative keeps one attribute of the target (a near miss, not nonsense)
        tgt = s.instances[neg.target]
        color, shape = neg.target_name.split()
        assert color in sw.COLORS and shape in sw.SHAPES
        assert color == tgt.attributes["color"] or shape == tgt.attributes["shape"]
        if neg.kind == "polling-swap":  # both words come from present objects
            assert color in {i.attributes["color"] for i in s.instances}
            assert shape in {i.attributes["shape"] for i in s.instances}
        kinds.add(neg.kind)
        assert pos.is_correct("Yes, there is.") and not pos.is_correct("No.")
        assert neg.is_correct("no") and not neg.is_correct("yes")
    assert kinds == {"polling-swap", "polling-absent"}


def test_vqa_answers_are_right(scenes):
    for s in scenes:
        for t, inst in enumerate(s.instances):
            shape_q, color_q = sw.questions(s, "vqa", target=t)
            assert shape_q.prompt == f"what shape is the {inst.attributes['color']} object ?"
            assert shape_q.answer == inst.attributes["shape"]
            assert color_q.prompt == f"what color is the {inst.attributes['shape']} ?"
            assert color_q.answer == inst.attributes["color"]
            # the asked attribute names exactly one object in the scene
            assert sum(i.attributes["color"] == inst.attributes["color"]
                       for i in s.instances) == 1
            wrong = next(x for x in sw.SHAPES if x != inst.attributes["shape"])
            assert shape_q.is_correct(inst.attributes["shape"] + " .")
            assert not shape_q.is_correct(wrong)


def test_generative_caption_names_every_object(scenes):
    for s in scenes:
        (q,) = _questions(s, "generative")
        for inst in s.instances:
            assert f"a {inst.name}" in q.answer
        assert q.is_correct(f"there is a {s.instances[q.target].name} here")
        assert not q.is_correct("an empty picture")


def test_vocabulary_covers_all_text(scenes):
    vocab = set(sw.vocabulary())
    for s in scenes[:10]:
        for setting in ("generative", "polling", "vqa"):
            for q in _questions(s, setting):
                words = f"{q.prompt} {q.answer_prefix} {q.answer}".split()
                assert set(words) <= vocab


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        sw.generate(0)
    with pytest.raises(ValueError):
        sw.questions(sw.make_scene(0, 0), "essay")


def test_question_is_frozen_record():
    q = Question("polling", "p", "yes")
    with pytest.raises(AttributeError):
        q.answer = "no"  # type: ignore[misc]
