"""COCO round trip, real-COCO reading, `vislens world` output and dataset specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vislens.data import open_dataset, shapesworld
from vislens.data.coco import export_coco, load_coco
from vislens.data.samples import Instance, Sample
from vislens.data.world import write_world


@pytest.fixture(scope="module")
def scenes():
    return shapesworld.generate(12, seed=5)


def test_round_trip_keeps_pixels_masks_names_attributes(tmp_path, scenes):
    out = export_coco(scenes, tmp_path / "ds")
    assert (out / "annotations.json").is_file()
    loaded = load_coco(out)
    assert [s.id for s in loaded] == [s.id for s in scenes]
    for a, b in zip(scenes, loaded, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert [i.name for i in b.instances] == [i.name for i in a.instances]
        for ia, ib in zip(a.instances, b.instances, strict=True):
            assert np.array_equal(ia.mask, ib.mask)
            assert ia.box == ib.box
            assert ia.attributes == ib.attributes
        assert b.meta["seed"] == 5 and b.meta["index"] == a.meta["index"]
        assert len(b.meta["ann_ids"]) == len(b.instances)


def test_export_is_standard_coco(tmp_path, scenes):
    out = export_coco(scenes, tmp_path / "ds")
    data = json.loads((out / "annotations.json").read_text())
    names = {c["name"] for c in data["categories"]}
    assert names == {i.name for s in scenes for i in s.instances}
    assert all(" " in n for n in names)  # "red circle": color and shape
    ann = data["annotations"][0]
    assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
    first = scenes[0].instances[0]
    x0, y0, x1, y1 = first.box
    assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0] and ann["area"] == first.area
    assert ann["attributes"]["shape"] == first.attributes["shape"]
    assert len(list((out / "images").iterdir())) == len(scenes)


def test_export_is_all_or_nothing(tmp_path, scenes):
    bad = Sample("bad", Image.new("RGB", (8, 8)),
                 [Instance("x", np.ones((4, 4), bool), (0, 0, 4, 4))])
    with pytest.raises(ValueError, match="does not match"):
        export_coco([*scenes[:3], bad], tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a temp dir remains
    export_coco(scenes[:2], tmp_path / "ds")
    with pytest.raises(FileExistsError):
        export_coco(scenes[:2], tmp_path / "ds")
    export_coco(scenes[:3], tmp_path / "ds", overwrite=True)
    assert len(load_coco(tmp_path / "ds")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def _real_coco(tmp_path):
    """A file laid out like the real COCO release: polygons, RLE, crowd, sparse ids."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "val2017" / "000000000042.jpg")
    Image.new("RGB", (20, 20)).save(tmp_path / "val2017" / "000000000007.jpg")
    square = np.zeros((30, 40), bool)
    square[5:15, 10:30] = True  # rows 5..14, cols 10..29
    crowd = np.zeros((30, 40), bool)
    crowd[20:25, 2:8] = True
    counts, prev, run = [], False, 0  # uncompressed RLE, column-major, starts with zeros
    for v in crowd.flatten(order="F"):
        if v != prev:
            counts.append(run)
            prev, run = v, 0
        run += 1
    counts.append(run)
    data = {
        "images": [{"id": 42, "file_name": "000000000042.jpg", "width": 40, "height": 30},
                   {"id": 7, "file_name": "000000000007.jpg", "width": 20, "height": 20}],
        "annotations": [
            {"id": 900, "image_id": 42, "category_id": 18, "iscrowd": 0, "area": 200.0,
             "bbox": [10, 5, 20, 10],
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            {"id": 901, "image_id": 42, "category_id": 1, "iscrowd": 1, "area": 30.0,
             "bbox": [2, 20, 6, 5], "segmentation": {"size": [30, 40], "counts": counts}},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 18, "name": "dog", "supercategory": "animal"}],
    }
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path, square, crowd


def test_reads_real_coco_polygons_rle_and_crowds(tmp_path):
    path, square, crowd = _real_coco(tmp_path)
    samples = load_coco(path)  # images found in ../val2017 by the split name
    assert [s.meta["image_id"] for s in samples] == [7, 42]
    empty, s = samples
    assert empty.instances == []
    assert [i.name for i in s.instances] == ["dog", "person"]
    dog, person = s.instances
    # pycocotools rasterises polygon edges inclusively: the mask covers the square
    assert (dog.mask & square).sum() == square.sum()
    assert dog.mask.sum() <= (square.sum() + 2 * 31)
    assert np.array_equal(person.mask, crowd)
    assert person.attributes == {"iscrowd": "1"} and dog.attributes == {}
    assert s.meta["ann_ids"] == [900, 901]
    no_crowd = load_coco(tmp_path / "annotations", include_crowd=False, limit=2)
    assert [i.name for i in no_crowd[1].instances] == ["dog"]
    assert len(load_coco(path, limit=1)) == 1


def test_clear_errors(tmp_path, scenes):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coco(tmp_path / "nowhere")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="annotations"):
        load_coco(tmp_path / "emptydir")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="empty"):
        load_coco(empty)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco(broken)
    out = export_coco(scenes[:2], tmp_path / "ds")
    (out / "images" / f"{scenes[0].id}.png").unlink()
    with pytest.raises(FileNotFoundError, match="image"):
        load_coco(out)


def test_write_world(tmp_path):
    summary = write_world(tmp_path / "world", n=6, seed=2)
    out = tmp_path / "world"
    assert summary["out"] == str(out) and summary["scenes"] == 6 and summary["questions"] == 30
    samples = load_coco(out)
    fresh = shapesworld.generate(6, seed=2)
    for a, b in zip(fresh, samples, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    rows = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert {r["setting"] for r in rows} == {"generative", "polling", "vqa"}
    assert len(rows) == 6 * 5  # 1 caption + 2 polling + 2 vqa per scene
    by_id = {s.id: s for s in samples}
    for r in rows:
        assert (out / r["image"]).is_file()
        s = by_id[r["sample_id"]]
        inst = s.instances[r["target"]]
        if r["kind"] == "vqa-shape":
            assert r["answer"] == inst.attributes["shape"]
        if r["kind"] == "vqa-color":
            assert r["answer"] == inst.attributes["color"]
        if r["setting"] == "polling":
            present = r["target_name"] in {i.name for i in s.instances}
            assert r["answer"] == ("yes" if present else "no")


def test_open_dataset(tmp_path):
    a = open_dataset("shapesworld:9", n=3)
    assert [s.id for s in a] == ["sw-9-0", "sw-9-1", "sw-9-2"]
    assert open_dataset("shapesworld", n=2)[1].id == "sw-1000-1"  # held out by default
    with pytest.raises(ValueError, match="trained on"):
        open_dataset("shapesworld:0", n=2)  # the toys' training world is refused
    export_coco(a, tmp_path / "c")
    b = open_dataset(f"coco:{tmp_path / 'c'}", n=2)
    assert [s.id for s in b] == ["sw-9-0", "sw-9-1"]
    for spec in ("imagenet21k", "shapesworld:abc", "coco:"):
        with pytest.raises(ValueError):
            open_dataset(spec)


def test_select_filters_before_reading_pixels(tmp_path):
    from vislens.data.coco import Selection, large_object, small_target

    path, _, _ = _real_coco(tmp_path)
    (tmp_path / "val2017" / "000000000007.jpg").unlink()  # never read when not selected
    # image 42: a 200 px^2 dog (unique class) and a crowd region: the crowd counts as one of
    # the <= 3 annotations, as in Neo et al.'s code, and does not disqualify the image
    picked = load_coco(path, select=Selection(3, (100, 300)))
    assert [s.meta["image_id"] for s in picked] == [42] and picked.read == 2
    assert picked[0].meta["target_ann_id"] == 900
    with pytest.raises(ValueError, match="passes the selection"):
        load_coco(path, select=Selection(1, (100, 300)))
    kept = load_coco(path, include_crowd=False,
                     select=lambda info, anns: info["id"] == 42)
    assert [s.meta["image_id"] for s in kept] == [42]
    dog = {"id": 1, "category_id": 18, "area": 1500.0, "iscrowd": 0}
    cat = {"id": 2, "category_id": 17, "area": 5000.0, "iscrowd": 0}
    assert small_target()({}, [dog, cat])
    assert not small_target()({}, [dog, dict(dog, id=3)])  # not the only dog
    assert not small_target()({}, [dog, cat, cat, cat])  # too many objects
    assert not small_target()({}, [cat])  # too large
    assert large_object()({}, [dict(cat, area=25000.0)])
    assert not large_object()({}, [dict(cat, area=25000.0), dog])
