"""The VQA question's region word ("top left", ...) is computed on the view the model sees
(LLaVA-1.5 centre-crops a 640x480 image to its middle 480x480), and an image whose region
word would also name another object is not used for VQA."""

from __future__ import annotations

import numpy as np
import pytest
from lookalikes import LLAVA15, checkpoint_dir
from PIL import Image

from vislens.data.samples import Instance, Sample
from vislens.experiments import prompts

pytestmark = pytest.mark.lookalike


def _square(size, cx, cy, r=12):
    w, h = size
    m = np.zeros((h, w), bool)
    m[cy - r:cy + r, cx - r:cx + r] = True
    return Instance("kite", m, (cx - r, cy - r, cx + r, cy + r))


def _sample(size, *objects):
    instances = []
    for name, (cx, cy) in objects:
        inst = _square(size, cx, cy)
        inst.name = name
        instances.append(inst)
    return Sample("s", Image.new("RGB", size, (30, 30, 30)), instances, {"source": "coco"})


@pytest.fixture(scope="module")
def llava15():
    from vislens.models import load

    return load(str(checkpoint_dir(LLAVA15)))


def test_region_is_computed_on_the_centre_crop(llava15):
    size = (640, 480)
    s = _sample(size, ("kite", (230, 240)), ("dog", (600, 400)))
    # on the whole image x = 230 is in the middle third; the model sees x in [80, 560)
    assert prompts.region(s.instances[0].box, size) == "center"
    probe = llava15.prepare([s.image], ["x"])
    assert prompts.visible_view(probe.token_map, size) == (80, 0, 560, 480)
    q = prompts.asked(llava15, s, 0, "vqa")
    assert q is not None and "in the left of the image" in q.prompt
    # the dog at x = 600 is cut away by the crop: it names no region
    assert prompts.singles_out(s, 0, (80, 0, 560, 480)) == "left"


def test_an_image_whose_region_word_names_two_objects_is_not_used_for_vqa(llava15):
    size = (640, 480)
    s = _sample(size, ("kite", (230, 240)), ("dog", (100, 300)))  # both on the crop's left
    assert prompts.region(s.instances[1].box, size) == "left"
    assert prompts.asked(llava15, s, 0, "vqa") is None
    assert prompts.asked(llava15, s, 0, "polling") is not None  # other settings still ask
    apart = _sample(size, ("kite", (230, 240)), ("dog", (500, 60)))
    assert prompts.asked(llava15, apart, 0, "vqa") is not None
