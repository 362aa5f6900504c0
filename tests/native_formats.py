"""Writers of the native data-set layouts the loaders read (VOC, DAVIS, BLINK, RefCOCO,
SPair-71k, ImageNet folders), built from ShapesWorld task records, so tests exercise
the real file formats without any download."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vislens.data.coco import export_coco
from vislens.data.voc import voc_palette


def write_voc(root: Path, maps, labels=lambda sm: sm.labels, rgb_masks: bool = False) -> dict:
    """JPEGImages/, SegmentationClass/ palette PNGs and the val split; {image id: labels}."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    written = {}
    for k, sm in enumerate(maps):
        image_id = f"2007_{k:06d}"
        sm.sample.image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        ids = labels(sm)
        mask = Image.fromarray(ids.astype(np.uint8), "P")
        mask.putpalette(voc_palette())
        if rgb_masks:
            mask = mask.convert("RGB")
        mask.save(root / "SegmentationClass" / f"{image_id}.png")
        written[image_id] = ids
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(written) + "\n")
    return written


def write_davis(root: Path, videos, first_only=()) -> Path:
    """JPEGImages/480p and Annotations/480p per video (only frame 0 annotated for the ids in
    `first_only`, as DAVIS test sets are), and the 2017 val list."""
    (root / "ImageSets" / "2017").mkdir(parents=True)
    for v in videos:
        frames, annotations = (root / kind / "480p" / v.id for kind in ("JPEGImages",
                                                                         "Annotations"))
        frames.mkdir(parents=True)
        annotations.mkdir(parents=True)
        for t, frame in enumerate(v.frames):
            frame.image.save(frames / f"{t:05d}.jpg", quality=95)
            if v.id in first_only and t > 0:
                continue
            mask = Image.fromarray(v.label_map(t).astype(np.uint8), "P")
            mask.putpalette(voc_palette())  # DAVIS uses VOC's color map
            mask.save(annotations / f"{t:05d}.png")
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(v.id for v in videos) + "\n")
    return root


def write_blink(path: Path, items) -> Path:
    """One BLINK parquet: idx, question, choices, answer and image_1..4 struct cells."""
    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    rows = [{"idx": f"val_Art_Style_{k}", "question": it.question, "choices": it.choices,
             "answer": it.answer,
             **{f"image_{j + 1}": ({"bytes": png(it.images[j]), "path": None}
                                   if j < len(it.images) else None) for j in range(4)}}
            for k, it in enumerate(items)]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("idx", pa.string()), ("question", pa.string()),
                        ("choices", pa.list_(pa.string())), ("answer", pa.string()),
                        *[(f"image_{j}", image) for j in range(1, 5)]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_refcoco(root: Path, refs) -> Path:
    """instances.json (COCO) + refs(unc).p over the refs' images."""
    samples = list({r.sample.id: r.sample for r in refs}.values())
    export_coco(samples, root)  # images/ + annotations.json, which RefCOCO calls instances.json
    (root / "annotations.json").rename(root / "instances.json")
    data = json.loads((root / "instances.json").read_text())
    image_ids = {img["vislens_id"]: img["id"] for img in data["images"]}
    anns: dict[int, list[int]] = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a["id"])
    raw = [{"ref_id": k, "image_id": image_ids[r.sample.id], "split": "val",
            "ann_id": anns[image_ids[r.sample.id]][r.target], "category_id": 1,
            "sentences": [{"sent": r.expression, "raw": r.expression, "sent_id": 100 + k}],
            "sent_ids": [100 + k]} for k, r in enumerate(refs)]
    (root / "refs(unc).p").write_bytes(pickle.dumps(raw, protocol=2))
    return root


def write_spair(root: Path, pairs) -> Path:
    """PairAnnotation/test/*.json over JPEGImages/<category>/."""
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    for k, p in enumerate(pairs):
        (root / "JPEGImages" / p.category).mkdir(parents=True, exist_ok=True)
        names = (f"{k:04d}_a", f"{k:04d}_b")
        p.source.image.save(root / "JPEGImages" / p.category / f"{names[0]}.jpg", quality=95)
        p.target.image.save(root / "JPEGImages" / p.category / f"{names[1]}.jpg", quality=95)
        pair = {"pair_id": k, "src_imname": f"{names[0]}.jpg", "trg_imname": f"{names[1]}.jpg",
                "category": p.category, "src_imsize": [*p.source.image.size, 3],
                "trg_imsize": [*p.target.image.size, 3], "src_bndbox": list(p.source_box),
                "trg_bndbox": list(p.target_box), "src_kps": p.source_points.tolist(),
                "trg_kps": p.target_points.tolist(),
                "kps_ids": [str(i) for i in p.meta["keypoint_ids"]]}
        name = f"{k:06d}-{names[0]}-{names[1]}:{p.category}.json"
        (root / "PairAnnotation" / "test" / name).write_text(json.dumps(pair))
    return root


def write_image_folder(root: Path, samples) -> Path:
    """ImageNet val layout: one synset folder per image."""
    for k, sample in enumerate(samples):
        folder = root / f"n0144{k:04d}"
        folder.mkdir(parents=True)
        sample.image.save(folder / f"ILSVRC2012_val_{k:08d}.JPEG", format="JPEG", quality=95)
    return root
