"""Native-format loaders read back exactly the ground truth a fixture wrote.

Each test writes a tiny dataset in the real on-disk layout of its benchmark
from ShapesWorld scenes, then loads it with the project's loader.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from native_formats import write_davis, write_voc
from PIL import Image

from vislens.data import tasks
from vislens.data.blink import load_blink
from vislens.data.coco import export_coco
from vislens.data.davis import load_davis
from vislens.data.imagenet import load_image_folder, load_imagenet_s
from vislens.data.refcoco import load_refcoco, read_refs
from vislens.data.shapesworld import SHAPES
from vislens.data.spair import load_spair
from vislens.data.voc import VOC_CLASSES, load_voc


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _close(a: Image.Image, b: Image.Image, tol: int = 40) -> bool:
    """JPEG is lossy: same picture means a small mean difference."""
    return np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() < tol / 10


# ---------------------------------------------------------------- Pascal VOC

def _voc_labels(sm):
    """Class ids with VOC's 255 'ignore' band around every object, as VOC draws it."""
    labels = sm.labels.copy()
    for inst in sm.sample.instances:
        m = inst.mask
        grown = m.copy()
        grown[1:] |= m[:-1]
        grown[:-1] |= m[1:]
        grown[:, 1:] |= m[:, :-1]
        grown[:, :-1] |= m[:, 1:]
        labels[grown & ~m & (labels == 0)] = 255
    return labels


@pytest.mark.parametrize("rgb_masks", [False, True])
def test_voc(tmp_path, rgb_masks):
    maps = tasks.semantic_maps(4, seed=1)
    root = tmp_path / "VOC2012"
    written = write_voc(root, maps, _voc_labels, rgb_masks)
    loaded = load_voc(root, classes=["background", *SHAPES])
    assert [m.sample.id for m in loaded] == list(written)
    for lm, sm in zip(loaded, maps, strict=True):
        labels = written[lm.sample.id]
        assert np.array_equal(lm.labels, labels)
        assert lm.ignore_index == 255 and (lm.labels == 255).any()
        assert sorted(lm.present()) == sorted(sm.present())
        for inst in lm.sample.instances:  # one union-mask instance per present class
            assert np.array_equal(inst.mask, sm.mask(inst.name))
        assert _close(lm.sample.image, sm.sample.image)
    default = load_voc(root, limit=1)
    assert len(default) == 1
    assert set(default[0].present()) <= set(VOC_CLASSES[1:7])


def test_voc_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        load_voc(tmp_path)
    root = tmp_path / "VOC2012"
    write_voc(root, tasks.semantic_maps(1, seed=1), _voc_labels)
    (next((root / "JPEGImages").iterdir())).unlink()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_voc(root)


# ---------------------------------------------------------------- ImageNet

def test_imagenet_s_ids_use_red_and_green(tmp_path):
    maps = tasks.semantic_maps(3, seed=2)
    root = tmp_path / "ImageNetS919"
    offset = 299  # ids above 255 need the green channel
    synsets = [f"n{9000 + i:08d}" for i in range(offset + len(SHAPES))]
    (tmp_path / "cats.txt").write_text("\n".join(synsets) + "\n")
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "\n".join(f"{s} word{i}, other" for i, s in enumerate(synsets)) + "\n")
    expected = {}
    for k, sm in enumerate(maps):
        ids = np.where(sm.labels > 0, sm.labels + offset, 0)
        ids[:3, :] = 1000  # ignore band
        syn = synsets[k]
        (root / "validation" / syn).mkdir(parents=True)
        (root / "validation-segmentation" / syn).mkdir(parents=True)
        sm.sample.image.save(root / "validation" / syn / f"ILSVRC2012_val_{k:08d}.JPEG",
                             format="JPEG", quality=95)
        rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(
            root / "validation-segmentation" / syn / f"ILSVRC2012_val_{k:08d}.png")
        expected[f"{syn}/ILSVRC2012_val_{k:08d}"] = (ids, sm)
    loaded = load_imagenet_s(root, categories=tmp_path / "cats.txt",
                             names=tmp_path / "LOC_synset_mapping.txt")
    assert len(loaded) == 3
    for lm in loaded:
        ids, sm = expected[lm.sample.id]
        assert np.array_equal(lm.labels, ids) and lm.labels.max() == 1000
        assert lm.ignore_index == 1000
        shape_ids = sorted(int(i) for i in np.unique(sm.labels) if i > 0)
        assert sorted(lm.present()) == sorted(f"word{i + offset - 1}" for i in shape_ids)
        assert _close(lm.sample.image, sm.sample.image)
    bare = load_imagenet_s(root, limit=1)[0]  # no category list: generic names
    assert all(name.startswith("class ") for name in bare.present())
    # the command line passes only the folder: the lists are found inside it
    (tmp_path / "cats.txt").rename(root / "ImageNetS_categories_im919.txt")
    (tmp_path / "LOC_synset_mapping.txt").rename(root / "LOC_synset_mapping.txt")
    found = load_imagenet_s(root)
    assert [m.present() for m in found] == [m.present() for m in loaded]


def test_image_folder(tmp_path):
    scenes = [tasks.semantic_maps(5, seed=3)[k].sample for k in range(5)]
    for k, s in enumerate(scenes):
        folder = tmp_path / "val" / ("n01440764" if k < 3 else "n01443537")
        folder.mkdir(parents=True, exist_ok=True)
        s.image.save(folder / f"img{k}.JPEG", format="JPEG", quality=95)
    (tmp_path / "val" / "n01440764" / "notes.txt").write_text("not an image")
    (tmp_path / "map.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    all_images = load_image_folder(tmp_path / "val", names=tmp_path / "map.txt")
    assert [s.meta["label"] for s in all_images] == ["n01440764"] * 3 + ["n01443537"] * 2
    assert [s.meta["class_name"] for s in all_images][-1] == "goldfish"
    assert all(_close(a.image, b.image) for a, b in zip(all_images, scenes, strict=True))
    balanced = load_image_folder(tmp_path / "val", per_class=1)
    assert [s.id for s in balanced] == ["n01440764/img0", "n01443537/img3"]
    assert len(load_image_folder(tmp_path / "val", limit=2)) == 2
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")


# ---------------------------------------------------------------- RefCOCO

def test_refcoco(tmp_path):
    refs = tasks.referring_expressions(10, seed=6)
    scenes = list({r.sample.id: r.sample for r in refs}.values())
    coco_dir = export_coco(scenes, tmp_path / "coco")
    data = json.loads((coco_dir / "annotations.json").read_text())
    root = tmp_path / "refcoco"
    root.mkdir()
    shutil.copy(coco_dir / "annotations.json", root / "instances.json")
    image_ids = {img["vislens_id"]: img["id"] for img in data["images"]}
    anns = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a["id"])
    raw = []
    for k, r in enumerate(refs):
        image_id = image_ids[r.sample.id]
        raw.append({"ref_id": k, "image_id": image_id, "ann_id": anns[image_id][r.target],
                    "split": "val" if k < 8 else "testA", "category_id": 1,
                    "file_name": f"COCO_train2014_{image_id:012d}_{k}.jpg",
                    "sentences": [{"sent": r.expression, "raw": r.expression, "sent_id": 100 + k,
                                   "tokens": r.expression.split()}],
                    "sent_ids": [100 + k]})
    (root / "refs(unc).p").write_bytes(pickle.dumps(raw, protocol=2))
    loaded = load_refcoco(root, split="val", images_dir=coco_dir / "images")
    assert len(loaded) == 8
    for got, want in zip(loaded, refs[:8], strict=True):
        assert got.expression == want.expression
        assert np.array_equal(got.mask, want.mask)
        assert got.sample.instances[got.target].name == want.sample.instances[want.target].name
    assert len(load_refcoco(root, split=None, images_dir=coco_dir / "images", limit=3)) == 3
    with pytest.raises(ValueError, match="no refs"):
        load_refcoco(root, split="train", images_dir=coco_dir / "images")


def test_refs_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": Evil()}]))
    with pytest.raises(ValueError, match="plain"):
        read_refs(path)


# ---------------------------------------------------------------- SPair-71k

def test_spair(tmp_path):
    pairs = tasks.correspondence_pairs(4, seed=7)
    root = tmp_path / "SPair-71k"
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    for k, p in enumerate(pairs):
        cat = p.category
        (root / "JPEGImages" / cat).mkdir(parents=True, exist_ok=True)
        src_name, trg_name = f"{k:04d}_a.jpg", f"{k:04d}_b.jpg"
        p.source.image.save(root / "JPEGImages" / cat / src_name, quality=95)
        p.target.image.save(root / "JPEGImages" / cat / trg_name, quality=95)
        pair = {"pair_id": k, "src_imname": src_name, "trg_imname": trg_name,
                "category": cat, "src_imsize": [96, 96, 3], "trg_imsize": [96, 96, 3],
                "src_bndbox": list(p.source_box), "trg_bndbox": list(p.target_box),
                "src_kps": p.source_points.tolist(), "trg_kps": p.target_points.tolist(),
                "kps_ids": [str(i) for i in p.meta["keypoint_ids"]],
                "viewpoint_variation": 0, "scale_variation": 1, "truncation": 0,
                "occlusion": 0, "mirror": 0}
        name = f"{k:06d}-{src_name[:-4]}-{trg_name[:-4]}:{cat}.json"
        (root / "PairAnnotation" / "test" / name).write_text(json.dumps(pair))
    loaded = load_spair(root, split="test")
    assert len(loaded) == 4
    for got, want in zip(loaded, pairs, strict=True):
        assert got.category == want.category
        assert np.allclose(got.source_points, want.source_points)
        assert np.allclose(got.target_points, want.target_points)
        assert got.target_box == want.target_box
        assert got.pck(want.target_points) == 1.0
        assert _close(got.target.image, want.target.image)
    one = load_spair(root, category=pairs[0].category)
    assert {p.category for p in one} == {pairs[0].category}
    with pytest.raises(ValueError, match="no SPair pairs"):
        load_spair(root, category="aeroplane")
    with pytest.raises(FileNotFoundError):
        load_spair(root, split="val")


# ---------------------------------------------------------------- DAVIS

def test_davis(tmp_path):
    vids = tasks.videos(3, seed=8, frames=5)
    root = tmp_path / "DAVIS"
    write_davis(root, vids, first_only={vids[2].id})
    loaded = load_davis(root, split="2017/val")
    assert [v.id for v in loaded] == [v.id for v in vids]
    for got, want in zip(loaded[:2], vids[:2], strict=True):
        assert len(got.frames) == 5
        for t in range(5):
            assert np.array_equal(got.label_map(t), want.label_map(t))
            assert _close(got.frames[t].image, want.frames[t].image)
    test_like = loaded[2]
    assert test_like.frames[0].meta["annotated"] and not test_like.frames[1].meta["annotated"]
    assert test_like.frames[1].instances == []
    assert len(load_davis(root, max_frames=2, limit=1)[0].frames) == 2
    with pytest.raises(FileNotFoundError):
        load_davis(root, split="2017/test-dev")


def test_davis_2016_binary_masks(tmp_path):
    (tmp_path / "JPEGImages/480p/blob").mkdir(parents=True)
    (tmp_path / "Annotations/480p/blob").mkdir(parents=True)
    Image.new("RGB", (16, 12)).save(tmp_path / "JPEGImages/480p/blob/00000.jpg")
    m = np.zeros((12, 16), np.uint8)
    m[2:6, 3:9] = 255
    Image.fromarray(m, "L").save(tmp_path / "Annotations/480p/blob/00000.png")
    (video,) = load_davis(tmp_path)
    (inst,) = video.frames[0].instances
    assert inst.attributes["object_id"] == "1" and np.array_equal(inst.mask, m > 0)


# ---------------------------------------------------------------- BLINK

def test_blink(tmp_path):
    items = tasks.multiple_choice(3, seed=9, kind="fill", n_choices=2) + \
        tasks.multiple_choice(2, seed=9, kind="shape", n_choices=3)
    rows = []
    for k, it in enumerate(items):
        row = {"idx": f"val_Art_Style_{k + 1}", "question": it.question,
               "sub_task": "Art_Style", "choices": it.choices, "answer": it.answer,
               "prompt": it.prompt(), "explanation": ""}
        for j in range(4):
            row[f"image_{j + 1}"] = ({"bytes": _png_bytes(it.images[j]), "path": None}
                                     if j < len(it.images) else None)
        rows.append(row)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("idx", pa.string()), ("question", pa.string()),
                        ("sub_task", pa.string()), *[(f"image_{j}", image_type)
                                                     for j in range(1, 5)],
                        ("choices", pa.list_(pa.string())), ("answer", pa.string()),
                        ("prompt", pa.string()), ("explanation", pa.string())])
    (tmp_path / "Art_Style").mkdir()
    path = tmp_path / "Art_Style" / "val-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    loaded = load_blink(tmp_path)
    assert len(loaded) == 5
    for got, want in zip(loaded, items, strict=True):
        assert got.answer == want.answer and got.answer_index == want.answer_index
        assert got.choices == want.choices and got.question == want.question
        assert len(got.images) == len(want.images)
        for a, b in zip(got.images, want.images, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert got.meta["sub_task"] == "Art_Style"
    assert len(load_blink(path, limit=2)) == 2
    pq.write_table(pa.table({"idx": ["1"], "question": ["q"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lacks BLINK column"):
        load_blink(tmp_path / "bad.parquet")


def test_open_task_reads_native_specs(tmp_path):
    from vislens.data import open_dataset, open_task

    root = tmp_path / "VOC2012"
    write_voc(root, tasks.semantic_maps(12, seed=1), _voc_labels)
    classes = ["background", *SHAPES]
    maps = open_task("semantic", f"voc:{root}", n=3, classes=classes)
    assert len(maps) == 3 and maps[0].classes == classes
    eps = open_task("fewshot", f"voc:{root}", n=2, shots=2, queries=1, classes=classes)
    assert len(eps) == 2 and len(eps[0].support) == 2
    vids = tasks.videos(2, seed=3, frames=3)
    write_davis(tmp_path / "DAVIS", vids)
    assert [v.id for v in open_task("video", f"davis:{tmp_path / 'DAVIS'}", n=1)] == [vids[0].id]
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(3):
        maps[k].sample.image.save(flat / f"{k}.png")
    ref = open_dataset(f"imagenet:{flat}", n=2)
    assert [s.id for s in ref] == ["0", "1"]
    assert np.array_equal(np.asarray(ref[0].image), np.asarray(maps[0].sample.image))
