"""Counterfactual scenes change the target and nothing else, and flip the answer word."""

import numpy as np
import pytest

from vislens.data import counterfactual as cf
from vislens.data import shapesworld as sw


def _pairs(attribute):
    out = []
    for sample in sw.generate(12, seed=1000):
        for t in range(len(sample.instances)):
            pair = cf.counterfactual(sample, t, attribute)
            if pair is not None:
                out.append(pair)
    return out


@pytest.mark.parametrize("attribute", cf.ATTRIBUTES)
def test_only_the_target_changes(attribute):
    pairs = _pairs(attribute)
    assert len(pairs) >= 12
    for p in pairs:
        a, b = np.asarray(p.clean.image), np.asarray(p.changed.image)
        differs = (a != b).any(-1)
        assert differs.any() and not (differs & ~p.object_mask()).any()
        for i, (x, y) in enumerate(zip(p.clean.instances, p.changed.instances, strict=True)):
            if i != p.target:
                assert x.name == y.name and np.array_equal(x.mask, y.mask)
        new = p.changed.instances[p.target]
        assert new.attributes[attribute] == p.foil != p.question.answer
        other = "shape" if attribute == "color" else "color"
        assert new.attributes[other] == p.clean.instances[p.target].attributes[other]
        # the question still names exactly one object in the changed scene, now answered by foil
        again = cf.question_for(p.changed, p.target, attribute)
        assert again.prompt == p.question.prompt and again.answer == p.foil


def test_colour_keeps_the_mask_and_the_values_are_absent_from_the_scene():
    for p in _pairs("color"):
        assert np.array_equal(p.clean.instances[p.target].mask,
                              p.changed.instances[p.target].mask)
        assert p.foil not in {i.attributes["color"] for i in p.clean.instances}


def test_shape_redrawn_at_the_same_place():
    p = _pairs("shape")[0]
    old, new = p.clean.instances[p.target], p.changed.instances[p.target]
    assert not np.array_equal(old.mask, new.mask)
    centre = [np.argwhere(m).mean(0) for m in (old.mask, new.mask)]
    assert np.abs(centre[0] - centre[1]).max() < 3


def test_bad_requests_say_what_to_do():
    sample = sw.make_scene(1000, 1)
    with pytest.raises(ValueError, match="choose color or shape"):
        cf.counterfactual(sample, 0, "size")
    taken = sample.instances[0].attributes["color"]
    with pytest.raises(ValueError, match="already in scene"):
        cf.counterfactual(sample, 0, "color", taken)
    foreign = sw.make_scene(1000, 1)
    foreign.meta = {"source": "coco"}
    with pytest.raises(ValueError, match="only for shapesworld"):
        cf.counterfactual(foreign, 0, "color")
    odd = sw.make_scene(1000, 1, size=96)
    odd.image = odd.image.rotate(90)
    with pytest.raises(ValueError, match="could not be redrawn"):
        cf.counterfactual(odd, 0, "color")
