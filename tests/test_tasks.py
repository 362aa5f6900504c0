"""The ShapesWorld task variants carry exact, checkable ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from vislens.data import tasks
from vislens.data.samples import MultipleChoice
from vislens.data.scenes import FILLS, ObjectSpec, fill_pattern, render, shape_keypoints
from vislens.data.shapesworld import COLORS, SHAPES


def _px(img):
    return np.asarray(img).astype(int)


def test_few_shot_episodes_have_class_masks_and_disjoint_images():
    eps = tasks.few_shot_episodes(12, seed=2, shots=5, queries=2)
    assert [e.name for e in eps[:6]] == list(SHAPES)  # classes are balanced
    for e in eps:
        assert len(e.support) == len(e.support_masks) == 5
        assert len(e.query) == len(e.query_masks) == 2
        ids = [s.id for s in e.support + e.query]
        assert len(set(ids)) == len(ids)
        for s, m in zip(e.support + e.query, e.support_masks + e.query_masks, strict=True):
            (inst,) = [i for i in s.instances if i.attributes["shape"] == e.name]
            assert np.array_equal(m, inst.mask) and m.any()
    again = tasks.few_shot_episodes(12, seed=2, shots=5, queries=2)
    assert [[s.id for s in e.support] for e in eps] == [[s.id for s in e.support] for e in again]
    by_color = tasks.few_shot_episodes(2, seed=2, by="color")
    assert by_color[0].name == list(COLORS)[0]
    s, m = by_color[0].query[0], by_color[0].query_masks[0]
    assert np.array_equal(m, s.instances_named(
        next(i.name for i in s.instances if i.attributes["color"] == by_color[0].name))[0].mask)


def test_cosegmentation_sets_share_one_class():
    sets = tasks.cosegmentation_sets(6, seed=1, size=4)
    for cs in sets:
        assert len(cs.samples) == len(cs.masks) == 4
        for s, m in zip(cs.samples, cs.masks, strict=True):
            assert cs.name in {i.attributes["shape"] for i in s.instances}
            assert np.array_equal(m, tasks.foreground(s, cs.name))
            # the mask is exactly the pixels of the class's object, nothing else
            others = np.zeros_like(m)
            for i in s.instances:
                if i.attributes["shape"] != cs.name:
                    others |= i.mask
            assert not (m & others).any()


def test_semantic_maps_label_every_object_pixel():
    for sm in tasks.semantic_maps(10, seed=4):
        assert sm.classes[0] == "background" and sm.classes[1:] == list(SHAPES)
        covered = np.zeros(sm.labels.shape, bool)
        for inst in sm.sample.instances:
            assert (sm.labels[inst.mask] == sm.classes.index(inst.attributes["shape"])).all()
            covered |= inst.mask
        assert (sm.labels[~covered] == 0).all()
        assert sorted(sm.present()) == sorted(i.attributes["shape"] for i in sm.sample.instances)
        name = sm.present()[0]
        assert np.array_equal(sm.mask(name), tasks.foreground(sm.sample, name))


def _resolve(expr, sample):
    """An independent reading of the expression: which instances does it describe?"""
    words = expr.split()
    colors = [w for w in words if w in COLORS]
    shapes = [w for w in words if w in SHAPES]
    insts = sample.instances
    for phrase in tasks.RELATIONS:
        if f" {phrase} " in expr:
            ref = [i for i in insts if i.attributes["shape"] == shapes[-1]][0]
            rel = tasks.RELATIONS[phrase]
            cands = [k for k, i in enumerate(insts) if i is not ref and rel(i.box, ref.box)]
            return [k for k in cands if not colors or insts[k].attributes["color"] == colors[0]]
    return [k for k, i in enumerate(insts)
            if (not colors or i.attributes["color"] == colors[0])
            and (not shapes or i.attributes["shape"] == shapes[0])]


def test_referring_expressions_name_exactly_their_target():
    refs = tasks.referring_expressions(120, seed=0)
    assert len(refs) == 120
    kinds = {r.kind for r in refs}
    assert {"relation", "color-relation", "shape", "color"} <= kinds
    for r in refs:
        assert _resolve(r.expression, r.sample) == [r.target], r.expression
        assert np.array_equal(r.mask, r.sample.instances[r.target].mask)
    relation = next(r for r in refs if r.kind == "relation")
    assert relation.expression.startswith("the shape ")


def test_keypoints_lie_on_the_drawn_shape():
    for shape in SHAPES:
        obj = ObjectSpec(shape, "red", 48.0, 47.0, 30.0, angle=0.2)
        mask = obj.mask(96)
        pts = shape_keypoints(shape, 48.0, 47.0, 30.0, 0.2)
        ys, xs = np.nonzero(mask)
        assert mask[47, 48]  # the center is inside every shape
        for x, y in pts:
            assert np.hypot(xs - x, ys - y).min() <= 1.5, (shape, x, y)


def test_correspondence_pairs_map_keypoints_exactly():
    pairs = tasks.correspondence_pairs(10, seed=3)
    for p in pairs:
        s = p.meta["scale"]
        assert len(p.source_points) == len(p.target_points) >= 4
        c_src, c_trg = p.source_points[0], p.target_points[0]  # center first
        assert np.allclose(p.target_points - c_trg, s * (p.source_points - c_src))
        main_src, main_trg = p.source.instances[0], p.target.instances[0]
        assert main_src.attributes["shape"] == main_trg.attributes["shape"] == p.category
        assert main_src.attributes["color"] != main_trg.attributes["color"]
        assert p.source_box == tuple(float(v) for v in main_src.box)
        # a distractor of another shape is present in both images
        assert len(p.source.instances) == len(p.target.instances) == 2
        assert p.pck(p.target_points) == 1.0
        assert p.pck(p.target_points + 50) == 0.0
        x0, y0, x1, y1 = p.target_box
        edge = 0.1 * max(x1 - x0, y1 - y0)
        assert p.pck(p.target_points + [edge * 0.9, 0]) == 1.0
        assert p.pck(p.target_points + [edge * 1.1, 0]) == 0.0
    assert len({round(p.meta["scale"], 3) for p in pairs}) > 5


def test_videos_have_consistent_ids_and_exact_masks():
    vids = tasks.videos(4, seed=5, frames=6)
    moved = False
    for v in vids:
        assert len(v.frames) == 6
        ids0 = {i.attributes["object_id"]: i.name for i in v.frames[0].instances}
        for t, f in enumerate(v.frames):
            px = _px(f.image)
            labels = v.label_map(t)
            for inst in f.instances:
                assert ids0.get(inst.attributes["object_id"], inst.name) == inst.name
                assert (px[inst.mask] == COLORS[inst.attributes["color"]]).all()
                assert (labels[inst.mask] == int(inst.attributes["object_id"])).all()
            union = sum(i.mask.astype(int) for i in f.instances)
            assert np.max(union) <= 1  # visible masks never overlap
            assert (labels[union == 0] == 0).all()
        first, last = v.frames[0].instances[0], v.frames[-1].instances[0]
        moved |= first.box != last.box
    assert moved


def test_render_occlusion_and_fills():
    a = ObjectSpec("square", "red", 40, 40, 30)
    b = ObjectSpec("circle", "blue", 50, 50, 30)
    s = render([a, b], "occ", 96)
    red, blue = s.instances
    assert not (red.mask & blue.mask).any()
    assert red.mask.sum() < a.mask(96).sum()  # partly hidden behind the circle
    assert np.array_equal(blue.mask, b.mask(96))
    hidden = render([ObjectSpec("circle", "red", 50, 50, 10), b], "h", 96)
    assert [i.name for i in hidden.instances] == ["blue circle"]
    m = a.mask(96)
    for fill in FILLS:
        painted = fill_pattern(m, fill)
        assert (painted <= m).all() and painted.any()
    assert fill_pattern(m, "outline").sum() < 0.5 * m.sum()
    with pytest.raises(ValueError):
        fill_pattern(m, "plaid")


@pytest.mark.parametrize("kind", ["shape", "color", "fill"])
def test_multiple_choice_has_exactly_one_right_answer(kind):
    items = tasks.multiple_choice(30, seed=1, kind=kind, n_choices=3)
    answers = {it.answer for it in items}
    assert answers == {"(A)", "(B)", "(C)"}  # the right answer moves around
    for it in items:
        assert isinstance(it, MultipleChoice)
        assert len(it.images) == 4 and len(it.choices) == 3
        ref, *cands = it.meta["attributes"]
        matching = [c for c, a in enumerate(cands) if a[kind] == ref[kind]]
        assert matching == [it.answer_index]
        right = cands[it.answer_index]
        assert all(right[a] != ref[a] for a in ref if a != kind)
        for c, a in enumerate(cands):
            if c != it.answer_index:
                assert all(a[x] == ref[x] for x in ref if x != kind)
        assert f"(C) {it.choices[2]}" in it.prompt()
    # the pictures really show the attributes: the reference's color is in its image
    it = tasks.multiple_choice(1, seed=1, kind="color")[0]
    ref_rgb = COLORS[it.meta["attributes"][0]["color"]]
    assert (np.asarray(it.images[0]).reshape(-1, 3) == ref_rgb).all(axis=1).any()


def test_bad_arguments():
    with pytest.raises(ValueError):
        tasks.few_shot_episodes(0)
    with pytest.raises(ValueError):
        tasks.semantic_maps(2, by="size")
    with pytest.raises(ValueError):
        tasks.multiple_choice(2, kind="texture")
    with pytest.raises(ValueError):
        tasks.multiple_choice(2, kind="fill", n_choices=4)
    with pytest.raises(ValueError):
        tasks.videos(1, frames=1)
    bad = MultipleChoice("x", "q", [], ["a", "b"], "(C)")
    with pytest.raises(ValueError):
        _ = bad.answer_index


def test_episodes_from_semantic_maps():
    maps = tasks.semantic_maps(60, seed=9)
    eps = tasks.episodes_from_maps(maps, 8, seed=1, shots=5, queries=1)
    assert [e.name for e in eps[:6]] == list(SHAPES)
    for e in eps:
        ids = [s.id for s in e.support + e.query]
        assert len(set(ids)) == 6
        for s, m in zip(e.support + e.query, e.support_masks + e.query_masks, strict=True):
            assert np.array_equal(m, s.meta["labels"] == SHAPES.index(e.name) + 1)
            assert m.any()
    fold1 = tasks.episodes_from_maps(maps, 4, fold=1, folds=3)  # 6 classes, 2 per fold
    assert {e.name for e in fold1} == {"triangle", "star"}
    co = tasks.cosegmentation_from_maps(maps, 3, size=3)
    assert all(len(c.samples) == 3 and all(m.any() for m in c.masks) for c in co)
    with pytest.raises(ValueError, match="no class"):
        tasks.episodes_from_maps(maps[:3], 2, shots=5)


def test_open_task_builds_every_shapesworld_task():
    from vislens.data import TASKS, open_task
    from vislens.data.samples import (
        CorrespondencePair,
        CoSegmentationSet,
        FewShotEpisode,
        ReferringExpression,
        SemanticMap,
        Video,
    )

    types = {"fewshot": FewShotEpisode, "coseg": CoSegmentationSet, "semantic": SemanticMap,
             "referring": ReferringExpression, "correspondence": CorrespondencePair,
             "video": Video, "multiple-choice": MultipleChoice}
    assert set(types) == set(TASKS)
    for task, cls in types.items():
        items = open_task(task, "shapesworld:4", n=2)
        assert len(items) == 2 and all(isinstance(x, cls) for x in items)
    shots = open_task("fewshot", "shapesworld", n=1, shots=2)[0]
    assert len(shots.support) == 2
    with pytest.raises(ValueError, match="unknown task"):
        open_task("depth")
    with pytest.raises(ValueError, match="reads shapesworld"):
        open_task("video", "blink:/x")
