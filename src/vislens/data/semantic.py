"""Per-pixel class maps -> SemanticMap records (shared by the VOC and ImageNet-S loaders)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vislens.data._io import mask_box
from vislens.data.samples import Instance, Sample, SemanticMap


def semantic_map(sample_id: str, image: Image.Image, labels: np.ndarray, classes: list[str],
                 ignore_index: int, meta: dict | None = None) -> SemanticMap:
    """Wrap a label map; the sample gets one union-mask instance per present class."""
    if labels.shape != (image.height, image.width):
        raise ValueError(f"{sample_id}: label map {labels.shape} does not match image "
                         f"{image.height}x{image.width}")
    instances = []
    for cid in np.unique(labels):
        cid = int(cid)
        if cid in (0, ignore_index):
            continue
        if cid >= len(classes):
            raise ValueError(f"{sample_id}: class id {cid} is beyond the {len(classes)} known "
                             "classes; pass the dataset's class list")
        mask = labels == cid
        instances.append(Instance(classes[cid], mask, mask_box(mask), {"class_id": str(cid)}))
    sample = Sample(sample_id, image, instances, dict(meta or {}))
    return SemanticMap(sample=sample, classes=list(classes), labels=labels.astype(np.int32),
                       ignore_index=ignore_index)
