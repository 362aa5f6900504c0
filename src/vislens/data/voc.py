"""Pascal VOC segmentation: JPEGImages/ + SegmentationClass/ palette PNGs (255 = ignore).

Few-shot segmentation (Pascal-5i) is built on these masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vislens.data._io import read_image, read_index_png
from vislens.data.samples import SemanticMap
from vislens.data.semantic import semantic_map

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant",
    "sheep", "sofa", "train", "tv monitor",
]
IGNORE = 255


def voc_palette(n: int = 256) -> list[int]:
    """VOC's color map (bit-interleaved label ids), flat [r, g, b, ...] for Image.putpalette."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def load_voc(root: str | Path, split: str = "val", limit: int | None = None,
             classes: list[str] | None = None) -> list[SemanticMap]:
    """VOC semantic maps of `ImageSets/Segmentation/{split}.txt` (every mask if absent).

    `root` is the VOC2012 folder (the one holding JPEGImages). RGB-rendered masks
    are mapped back to ids through the VOC palette.
    """
    root = Path(root)
    masks_dir = root / "SegmentationClass"
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"{masks_dir} not found; pass the VOC2012 folder "
                                "(with JPEGImages/ and SegmentationClass/)")
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if split_file.is_file():
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    else:
        ids = sorted(p.stem for p in masks_dir.glob("*.png"))
    if not ids:
        raise ValueError(f"no VOC masks found under {root} (split {split!r})")
    ids = ids[:limit] if limit else ids
    classes = list(classes or VOC_CLASSES)
    out = []
    for image_id in ids:
        image = read_image(_image_path(root / "JPEGImages", image_id))
        labels = read_voc_mask(masks_dir / f"{image_id}.png")
        out.append(semantic_map(image_id, image, labels, classes, IGNORE,
                                {"source": "voc", "split": split}))
    return out


def read_voc_mask(path: Path) -> np.ndarray:
    """Class ids of a VOC mask: palette indices, or RGB colors looked up in the palette."""
    try:
        return read_index_png(path).astype(np.int32)
    except ValueError:
        pass
    rgb = np.asarray(read_image(path)).astype(np.int64)
    pal = np.array(voc_palette(), dtype=np.int64).reshape(-1, 3)
    codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lookup = {int(code): i for i, code in enumerate(codes)}
    pixel_codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inverse = np.unique(pixel_codes, return_inverse=True)
    unknown = [int(u) for u in uniq if int(u) not in lookup]
    if unknown:
        raise ValueError(f"{path} has colors outside the VOC palette "
                         f"(e.g. #{unknown[0]:06x}); is it a VOC mask?")
    ids = np.array([lookup[int(u)] for u in uniq], dtype=np.int32)
    return ids[inverse].reshape(pixel_codes.shape)


def _image_path(folder: Path, stem: str) -> Path:
    for suffix in (".jpg", ".jpeg", ".png", ".JPEG", ".JPG"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"image {stem} not found in {folder}")
