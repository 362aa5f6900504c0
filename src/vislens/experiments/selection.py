"""Which samples an experiment keeps, as in Neo et al.'s released code.

A target must be the only instance of its class (so "the object" is
unambiguous) and lie in an area range (small objects: few object tokens).
The rule is `vislens.data.coco.Selection`'s, applied to loaded samples: the
FIRST class, in instance (annotation) order, with exactly one instance whose
area (COCO's `area` field where the data has one) lies strictly inside the
range; crowd regions count as instances and may be the target. A COCO image
the loader already selected on its raw annotations keeps the target chosen
there (meta `target_ann_id`), so selection and experiment never disagree.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vislens.data.coco import Selection, first_single
from vislens.data.samples import Sample


def choose_target(sample: Sample, area: tuple[float, float] | None, *, strict: bool = True,
                  crowd_target: bool = True) -> int | None:
    """The index of the sample's target instance, or None when no instance qualifies.

    Deterministic: Neo et al.'s rule, the first class (in annotation order) alone in the
    image with its area in the range; no random draw.
    `strict=False` takes both ends of the area range; `crowd_target=False` never picks a
    crowd region (attribute iscrowd="1").
    """
    if "target_ann_id" in sample.meta:  # chosen on the raw annotations (None: its mask was empty)
        ids = sample.meta.get("ann_ids", [])
        chosen = sample.meta["target_ann_id"]
        return ids.index(chosen) if chosen in ids else None
    groups: dict[str, list[int]] = {}
    for i, inst in enumerate(sample.instances):
        groups.setdefault(inst.name, []).append(i)
    rule = Selection(max_annotations=None, area=area, strict=strict, crowd_target=crowd_target)
    return first_single(list(groups.values()), rule,
                        area=lambda i: sample.instances[i].area,
                        crowd=lambda i: sample.instances[i].attributes.get("iscrowd") == "1")


def choose_targets(samples: list[Sample], area: tuple[float, float] | None,
                   **options) -> list[int | None]:
    """One target per sample (None where none qualifies); an error when none does anywhere,
    instead of an empty table."""
    targets = [choose_target(s, area, **options) for s in samples]
    if samples and all(t is None for t in targets):
        strict = options.get("strict", True)
        where = "" if area is None else (
            f" with an area in ({area[0]:g}, {area[1]:g}) px" if strict
            else f" with an area in [{area[0]:g}, {area[1]:g}] px")
        raise ValueError(f"none of the {len(samples)} images has a target object that is the "
                         f"only one of its class{where}; widen it with --area MIN:MAX or use "
                         "other images")
    return targets


def noise_object(image: Image.Image, mask: np.ndarray, seed: int) -> Image.Image:
    """The image with the object's pixels replaced by uniform noise (the context stays)."""
    pixels = np.array(image.convert("RGB"))
    if mask.shape != pixels.shape[:2]:
        raise ValueError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{pixels.shape[1]}x{pixels.shape[0]}; masks must be in original image pixels"
        )
    rng = np.random.default_rng(seed)
    pixels[mask] = rng.integers(0, 256, size=(int(mask.sum()), 3), dtype=np.uint8)
    return Image.fromarray(pixels)
