"""Image and target selection as Neo et al.'s released code does it
(clemneo/llava-interp scripts/ablation_experiment.py:126-150): at most 3 annotations, crowd
ones included; the target is the FIRST category, in annotation order, with exactly one
instance whose COCO `area` lies strictly inside the range; that one area throughout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vislens.data.coco import Selection, load_coco, small_target
from vislens.data.samples import Instance, Sample
from vislens.experiments.selection import choose_target, choose_targets


def _ann(i, cat, area, crowd=0):
    return {"id": i, "category_id": cat, "area": area, "iscrowd": crowd}


def test_crowd_annotations_count_toward_three_and_do_not_reject_the_image():
    rule = small_target()
    dog, cat = _ann(1, 18, 1500.0), _ann(2, 17, 9000.0)
    assert rule({}, [dog, cat, _ann(3, 1, 40000.0, crowd=1)]) == dog  # 3 with the crowd: kept
    assert rule({}, [dog, cat, cat | {"id": 4}, _ann(3, 1, 400.0, crowd=1)]) is None  # 4
    # a crowd region of the dog's class makes the dog not alone in its class
    assert rule({}, [dog, _ann(5, 18, 900.0, crowd=1)]) is None


def test_target_is_the_first_category_in_annotation_order_with_a_strict_area():
    rule = small_target()
    a, b = _ann(1, 5, 1200.0), _ann(2, 3, 1800.0)
    assert rule({}, [a, b]) == a and rule({}, [b, a]) == b
    # the ends of (1000, 2000) are out; vislens' old inclusive range is an option
    assert rule({}, [_ann(1, 5, 1000.0), _ann(2, 3, 2000.0)]) is None
    assert Selection(area=(1000.0, 2000.0), strict=False)({}, [_ann(1, 5, 2000.0)])["id"] == 1
    # a crowd target is Neo's default; crowd_target=False skips it for the next category
    crowd, plain = _ann(1, 5, 1500.0, crowd=1), _ann(2, 3, 1500.0)
    assert rule({}, [crowd, plain]) == crowd
    assert small_target(crowd_target=False)({}, [crowd, plain]) == plain


def test_loaded_samples_keep_the_first_target_not_a_random_one():
    masks = [np.zeros((60, 60), bool) for _ in range(3)]
    masks[0][0:30, 0:40] = True  # 1200 px
    masks[1][40:60, 0:60] = True  # 1200 px
    masks[2][30:40, 50:60] = True  # 100 px
    s = Sample("s", Image.new("RGB", (60, 60)),
               [Instance("cat", masks[2], (50, 30, 60, 40)),
                Instance("dog", masks[0], (0, 0, 40, 30)),
                Instance("cow", masks[1], (0, 40, 60, 60))])
    assert choose_target(s, (1000.0, 2000.0)) == 1  # the dog: first in order in range


def _coco_square(tmp_path, side: int, area: float):
    """One image with one square polygon of side x side pixels whose COCO `area` is `area`."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (100, 100), (20, 20, 20)).save(tmp_path / "images" / "a.png")
    x0 = y0 = 10
    poly = [x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "area": area, "bbox": [x0, y0, side, side],
                             "segmentation": [poly]}],
            "categories": [{"id": 1, "name": "kite"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    return tmp_path


def test_one_area_throughout_the_coco_area_field(tmp_path):
    """COCO area 1993.6 but a 2025-pixel mask: selected on the raw records, it must stay
    the target (it used to be dropped silently when the mask was measured again)."""
    path = _coco_square(tmp_path, 45, 1993.6)
    samples = load_coco(path, select=small_target())
    inst = samples[0].instances[0]
    assert inst.mask.sum() == 2025 and inst.area == pytest.approx(1993.6)
    assert choose_targets(samples, (1000.0, 2000.0)) == [0]
    # the same rule on the loaded sample without the loader's pick
    del samples[0].meta["target_ann_id"]
    assert choose_target(samples[0], (1000.0, 2000.0)) == 0
