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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vislens.data._io import atomic_dir, mask_box, read_image
from vislens.data.samples import Instance, Sample, SampleList

ANNOTATIONS = "annotations.json"
IMAGES = "images"


def export_coco(samples: list[Sample], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `out_dir/images/*.png` and `out_dir/annotations.json`, all or nothing."""
    if not samples:
        raise ValueError("nothing to export: the sample list is empty")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_coco(samples, tmp)
    return Path(out_dir)


def write_coco(samples: list[Sample], root: Path, info: dict | None = None) -> dict:
    """Write the dataset into an existing directory (callers own atomicity); `info` adds
    fields to the file's `info` record (`vislens world` writes its world seed there)."""
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
        "info": {"description": "written by vislens", "version": "1.0", **(info or {})},
        "images": images, "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": n.split()[-1]}
                       for n, i in cat_ids.items()],
    }
    (root / ANNOTATIONS).write_text(json.dumps(dataset))
    return dataset


Selector = Callable[[dict, list[dict]], object]


def load_coco(path: str | Path, images_dir: str | Path | None = None,
              limit: int | None = None, include_crowd: bool = True,
              select: Selector | None = None) -> SampleList:
    """Samples from a COCO instances file (ours or real: polygons, RLE, crowds).

    `path` is the annotations JSON or a directory holding `annotations.json`
    (or one `instances_*.json`). Images are looked up in `images_dir`, else
    next to the annotations (`images/`, or the split folder such as
    `train2017/` named by `instances_train2017.json`). Images are in id order;
    `limit` keeps the first ones. Crowd regions are kept but marked with
    attribute iscrowd="1" (drop them with include_crowd=False).
    Each sample's meta holds `image_id`, `file_name` and `ann_ids` (the COCO
    annotation id of every instance, in order: what RefCOCO refers to).
    `select(image_info, annotations)` filters images on their raw COCO records
    BEFORE any pixel is read (see `Selection`, `small_target` / `large_object`), so
    picking 40 images out of COCO train stays cheap; `limit` counts kept images.
    When it returns an annotation (a dict), that annotation is the image's target:
    its id goes to meta `target_ann_id`. The result's `read` is how many images the
    selection looked at (all of them, or up to the `limit`-th kept one).
    A file written by `vislens world` from a ShapesWorld training world is refused.
    """
    ann_file = find_annotations(Path(path))
    coco = read_instances(ann_file)
    check_world(coco.dataset, ann_file)
    image_ids = sorted(coco.imgs)
    if not image_ids:
        raise ValueError(f"{ann_file} lists no images; it is an empty dataset")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    targets: dict[int, int] = {}
    read = len(image_ids)
    if select is not None:
        kept = []
        for n_read, i in enumerate(image_ids, start=1):
            chosen = select(coco.imgs[i], coco.imgToAnns.get(i, []))
            if not chosen:
                continue
            kept.append(i)
            if isinstance(chosen, dict) and "id" in chosen:
                targets[i] = chosen["id"]
            if limit is not None and len(kept) == limit:
                read = n_read
                break
        image_ids = kept
        if not image_ids:
            raise ValueError(f"none of the {read} images of {ann_file.name} passes the "
                             f"selection ({getattr(select, 'rule', 'custom filter')}); widen "
                             "the target area with --area MIN:MAX")
    else:
        image_ids = image_ids[:limit] if limit is not None else image_ids
        read = len(image_ids)
    img_root = find_images_dir(ann_file, images_dir, coco.imgs[image_ids[0]]["file_name"])
    samples = SampleList([coco_sample(coco, i, img_root, include_crowd) for i in image_ids],
                         read=read)
    for sample in samples:
        if sample.meta["image_id"] in targets:
            sample.meta["target_ann_id"] = targets[sample.meta["image_id"]]
    return samples


def check_world(dataset: dict, ann_file: Path) -> None:
    """Refuse a data set `vislens world` wrote from a world the shipped toys were trained on
    (its `info.vislens_world` seed, or its images' ShapesWorld seeds)."""
    from vislens.data import shapesworld

    seeds = set()
    world = (dataset.get("info") or {}).get("vislens_world")
    if world is not None:
        seeds.add(world)
    for img in dataset.get("images", []):
        meta = img.get("vislens_meta") or {}
        if meta.get("source") == "shapesworld" and "seed" in meta:
            seeds.add(meta["seed"])
    for seed in sorted(seeds, key=str):
        try:
            shapesworld.check_held_out(int(seed))
        except ValueError as err:
            raise ValueError(f"{ann_file} was exported from ShapesWorld world {seed}: {err}"
                             ) from None
        except TypeError:
            continue


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
        area = ann.get("area")
        instances.append(Instance(name=cat["name"], mask=mask, box=mask_box(mask),
                                  attributes=attributes,
                                  annotated_area=None if area is None else float(area)))
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



@dataclass(frozen=True)
class Selection:
    """Neo et al.'s image selection on raw COCO records, as their released code does it
    (scripts/ablation_experiment.py:126-150): at most `max_annotations` annotations, crowd
    ones counted like any other; the target is the FIRST category, in annotation order,
    with exactly one annotation whose COCO `area` lies strictly inside `area`.

    Called as `select(image_info, annotations)` it returns that target annotation, or None.
    Stricter vislens rules are options: `strict=False` takes both ends of the range,
    `crowd_target=False` never takes a crowd region as the target.
    """

    max_annotations: int | None = 3
    area: tuple[float, float] | None = (1000.0, 2000.0)
    strict: bool = True
    crowd_target: bool = True

    @property
    def rule(self) -> str:
        parts = [] if self.max_annotations is None else [
            f"at most {self.max_annotations} annotations (crowd ones included)"]
        if self.area is not None:
            lo, hi = self.area
            where = f"({lo:g}, {hi:g})" if self.strict else f"[{lo:g}, {hi:g}]"
            parts.append(f"one object alone in its class with a COCO area in {where} px^2")
        else:
            parts.append("one object alone in its class")
        if not self.crowd_target:
            parts.append("the target not a crowd region")
        return ", ".join(parts)

    def in_range(self, area: float) -> bool:
        if self.area is None:
            return True
        lo, hi = self.area
        return lo < area < hi if self.strict else lo <= area <= hi

    def __call__(self, info: dict, anns: list[dict]) -> dict | None:
        if not anns or (self.max_annotations is not None and len(anns) > self.max_annotations):
            return None
        groups: dict = {}
        for a in anns:  # dict order: categories in the order their first annotation comes
            groups.setdefault(a["category_id"], []).append(a)
        return first_single(list(groups.values()), self)


def first_single(groups: list[list], rule: Selection,
                 area=lambda a: a["area"], crowd=lambda a: bool(a.get("iscrowd", 0))):
    """The one member of the first group (a class, in annotation order) that is alone in
    it, in the area range and allowed as a target; None if no group qualifies. The rule of
    `Selection`, shared with vislens.experiments.selection for samples already loaded."""
    for group in groups:
        if len(group) != 1:
            continue
        member = group[0]
        if rule.in_range(area(member)) and (rule.crowd_target or not crowd(member)):
            return member
    return None


def small_target(max_annotations: int = 3, area: tuple[float, float] = (1000.0, 2000.0),
                 **options) -> Selection:
    """Neo et al.'s ablation set (A1): small targets, so their object tokens are few."""
    return Selection(max_annotations, tuple(area), **options)


def large_object(max_annotations: int = 1, area: tuple[float, float] = (20000.0, 30000.0),
                 **options) -> Selection:
    """Neo et al.'s logit-lens set (A2): one large object."""
    return Selection(max_annotations, tuple(area), **options)
