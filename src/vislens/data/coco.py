"""COCO instances format: write any samples as a COCO dataset, read real COCO back.

COCO is the exchange format of this project: ShapesWorld exports to it (so
other tools can read our scenes) and real COCO images come in through it.
Masks are written as compressed RLE, which is lossless, so an export/load
round trip returns the exact same masks. Class names become category names;
attributes (shape, color, ...) that COCO has no slot for live in extra fields
(`attributes` on annotations, `vislens_id` / `vislens_meta` on images) that
other COCO readers simply ignore.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vislens.data._io import atomic_dir, mask_box, read_image
from vislens.data.samples import Instance, Sample

ANNOTATIONS = "annotations.json"
IMAGES = "images"


def export_coco(samples: list[Sample], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `out_dir/images/*.png` and `out_dir/annotations.json`, all or nothing."""
    if not samples:
        raise ValueError("nothing to export: the sample list is empty")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_coco(samples, tmp)
    return Path(out_dir)


def write_coco(samples: list[Sample], root: Path) -> dict:
    """Write the dataset into an existing directory (callers own atomicity)."""
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    names = sorted({inst.name for s in samples for inst in s.instances})
    cat_ids = {name: i + 1 for i, name in enumerate(names)}
    images, annotations, seen = [], [], set()
    for image_id, sample in enumerate(samples, start=1):
        file_name = _file_name(sample.id, image_id, seen)
        sample.image.convert("RGB").save(root / IMAGES / file_name)
        w, h = sample.image.size
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h,
                       "vislens_id": sample.id, "vislens_meta": _jsonable(sample.meta)})
        for inst in sample.instances:
            if inst.mask.shape != (h, w):
                raise ValueError(f"sample {sample.id}: mask {inst.mask.shape} does not match "
                                 f"image {(h, w)}")
            rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = inst.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": cat_ids[inst.name], "segmentation": rle,
                "area": inst.area, "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                "attributes": dict(inst.attributes),
            })
    dataset = {
        "info": {"description": "written by vislens", "version": "1.0"},
        "images": images, "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": n.split()[-1]}
                       for n, i in cat_ids.items()],
    }
    (root / ANNOTATIONS).write_text(json.dumps(dataset))
    return dataset


Selector = Callable[[dict, list[dict]], bool]


def load_coco(path: str | Path, images_dir: str | Path | None = None,
              limit: int | None = None, include_crowd: bool = True,
              select: Selector | None = None) -> list[Sample]:
    """Samples from a COCO instances file (ours or real: polygons, RLE, crowds).

    `path` is the annotations JSON or a directory holding `annotations.json`
    (or one `instances_*.json`). Images are looked up in `images_dir`, else
    next to the annotations (`images/`, or the split folder such as
    `train2017/` named by `instances_train2017.json`). Images are in id order;
    `limit` keeps the first ones. Crowd regions are kept but marked with
    attribute iscrowd="1" (drop them with include_crowd=False).
    Each sample's meta holds `image_id`, `file_name` and `ann_ids` (the COCO
    annotation id of every instance, in order: what RefCOCO refers to).
    `select(image_info, annotations) -> bool` filters images on their raw COCO
    records BEFORE any pixel is read (see `small_target` / `large_object`), so
    picking 40 images out of COCO train stays cheap; `limit` counts kept images.
    """
    ann_file = find_annotations(Path(path))
    coco = read_instances(ann_file)
    image_ids = sorted(coco.imgs)
    if not image_ids:
        raise ValueError(f"{ann_file} lists no images; it is an empty dataset")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if select is not None:
        image_ids = [i for i in image_ids if select(coco.imgs[i], coco.imgToAnns.get(i, []))]
        if not image_ids:
            raise ValueError(f"no image of {ann_file.name} passes the selection "
                             f"({getattr(select, 'rule', 'custom filter')}); widen the target "
                             "area with --area MIN:MAX")
    image_ids = image_ids[:limit] if limit is not None else image_ids
    img_root = find_images_dir(ann_file, images_dir, coco.imgs[image_ids[0]]["file_name"])
    return [coco_sample(coco, i, img_root, include_crowd) for i in image_ids]


def find_annotations(path: Path) -> Path:
    """The instances JSON a user meant by a file or dataset directory."""
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a COCO annotations file or folder")
    if (path / ANNOTATIONS).is_file():
        return path / ANNOTATIONS
    found = sorted(path.glob("instances_*.json")) + sorted(
        path.glob("annotations/instances_*.json"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        listed = ", ".join(f.name for f in found)
        raise ValueError(f"{path} holds several instances files ({listed}); pass one of them")
    raise FileNotFoundError(f"no {ANNOTATIONS} or instances_*.json in {path}; "
                            "pass the COCO annotations file")


def read_instances(ann_file: Path) -> COCO:
    """pycocotools' index of the file, quietly and with a one-line error on bad JSON."""
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{ann_file} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{ann_file} is not a COCO instances file (no 'images' list)")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_sample(coco: COCO, image_id: int, img_root: Path, include_crowd: bool = True) -> Sample:
    """One image with its instances; polygons and RLE both go through pycocotools."""
    info = coco.imgs[image_id]
    image = read_image(img_root / info["file_name"])
    h, w = image.height, image.width
    if (info.get("height", h), info.get("width", w)) != (h, w):
        raise ValueError(f"{info['file_name']} is {w}x{h} but the annotations say "
                         f"{info.get('width')}x{info.get('height')}")
    instances, ann_ids = [], []
    for ann in coco.imgToAnns.get(image_id, []):
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= notice, harmless
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = coco.annToMask(ann).astype(bool)
        if not mask.any():
            continue  # degenerate polygon: nothing to point at
        cat = coco.cats.get(ann["category_id"])
        if cat is None:
            raise ValueError(f"annotation {ann['id']} uses category {ann['category_id']} "
                             "which the file does not define")
        attributes = {str(k): str(v) for k, v in ann.get("attributes", {}).items()}
        if ann.get("iscrowd", 0):
            attributes["iscrowd"] = "1"
        instances.append(Instance(name=cat["name"], mask=mask, box=mask_box(mask),
                                  attributes=attributes))
        ann_ids.append(ann["id"])
    meta = dict(info.get("vislens_meta") or {"source": "coco"})
    meta.update(image_id=image_id, file_name=info["file_name"], ann_ids=ann_ids)
    return Sample(id=str(info.get("vislens_id", f"coco-{image_id}")), image=image,
                  instances=instances, meta=meta)


def find_images_dir(ann_file: Path, images_dir: str | Path | None, probe: str,
                    extra: tuple[Path, ...] = ()) -> Path:
    """`images_dir` if given, else the first usual place next to `ann_file` holding `probe`."""
    if images_dir is not None:
        root = Path(images_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"images directory {root} not found")
        return root
    base = ann_file.parent
    candidates = [base / IMAGES, base]
    if ann_file.stem.startswith("instances_"):
        split = ann_file.stem.removeprefix("instances_")
        candidates += [base / split, base.parent / split, base.parent / IMAGES / split]
    candidates += list(extra)
    for root in candidates:
        if (root / probe).is_file():
            return root
    raise FileNotFoundError(f"cannot find image {probe} near {ann_file}; pass images_dir "
                            "(--images-dir) pointing at the folder of images")


def _file_name(sample_id: str, image_id: int, seen: set[str]) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in sample_id) or str(image_id)
    name = f"{stem}.png"
    if name in seen:
        name = f"{stem}-{image_id}.png"
    seen.add(name)
    return name


def _jsonable(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
        except TypeError:
            continue  # arrays / images in meta stay in memory only
        out[str(k)] = v
    return out



def single_target(max_annotations: int, area: tuple[float, float]) -> Selector:
    """Images with <= max_annotations non-crowd objects, one of which is the only
    instance of its class and has a COCO area in [lo, hi] px^2."""
    lo, hi = area

    def select(info: dict, anns: list[dict]) -> bool:
        if not anns or len(anns) > max_annotations or any(a.get("iscrowd", 0) for a in anns):
            return False
        counts: dict[int, int] = {}
        for a in anns:
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
        return any(counts[a["category_id"]] == 1 and lo <= a["area"] <= hi for a in anns)

    select.rule = (f"at most {max_annotations} annotations, no crowd, one object alone in its "
                   f"class with an area in [{lo:g}, {hi:g}] px^2")
    return select


def small_target(max_annotations: int = 3, area: tuple[float, float] = (1000, 2000)) -> Selector:
    """Neo et al.'s ablation set (A1): small targets, so their object tokens are few."""
    return single_target(max_annotations, area)


def large_object(max_annotations: int = 1, area: tuple[float, float] = (20000, 30000)
                 ) -> Selector:
    """Neo et al.'s logit-lens set (A2): one large object."""
    return single_target(max_annotations, area)
