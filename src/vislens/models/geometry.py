"""Where an image token comes from in the ORIGINAL image: the shared primitives the
family modules (vislens.models.families) build their layouts from.

Every layout replays the image processor's own steps (pad, resize, crop,
anyres tiling, unpadding, 2x2 merge) as per-axis affine maps, using the
transformers functions the processors and models call themselves
(`select_best_resolution`, `get_patch_output_size`, `get_anyres_image_grid_shape`,
`unpad_image`, `get_resize_output_image_size`), so the map follows the library
rather than a re-derivation of it.

A token's box is what its patch really sees, not a share of the image: the
vision tower's stride-`patch` convolution reads floor(side / patch) patches of
`patch` pixels from each processed tile's origin and never the remainder
(SigLIP-384/14: 27 x 14 = 378 of 384 px), so the boxes of one grid need not
tile the image. Pixels in such a gap (and pixels cut by a center crop) are seen
by no token and belong to no box. Where the model blends patches (OneVision's
anyres_max_N bilinear shrink) a cell's box is centred on what the blend sees;
see `cells`.

A layout is the list of image-token slots of one image in LM sequence order:
patches (with tile, row, col, crop and a pixel box) and newline slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Axis:
    """processed = original * scale + shift, along one axis."""

    scale: float = 1.0
    shift: float = 0.0

    def then_resize(self, factor: float) -> Axis:
        return Axis(self.scale * factor, self.shift * factor)

    def then_shift(self, offset: float) -> Axis:
        return Axis(self.scale, self.shift + offset)

    def to_original(self, v: np.ndarray) -> np.ndarray:
        return (np.asarray(v, dtype=np.float64) - self.shift) / self.scale


@dataclass
class Layout:
    """Image-token slots of one image, in sequence order."""

    image_size: tuple[int, int]  # (width, height) of the original image
    tile: list[int] = field(default_factory=list)
    crop: list[int] = field(default_factory=list)
    row: list[int] = field(default_factory=list)
    col: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    newline: list[bool] = field(default_factory=list)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    geometric: bool = True  # False: positions only (a family without a layout), no boxes

    def add_grid(self, tile: int, x: tuple[np.ndarray, np.ndarray],
                 y: tuple[np.ndarray, np.ndarray], crop: np.ndarray | None = None,
                 newline: bool = False) -> None:
        """Append a raster grid; x = (x0, x1) per column, y = (y0, y1) per row, original px."""
        (x0, x1), (y0, y1) = x, y
        nr, nc = len(y0), len(x0)
        self.grids[tile] = (nr, nc)
        for i in range(nr):
            for j in range(nc):
                box = np.array([x0[j], y0[i], x1[j], y1[i]], dtype=np.float64)
                self._slot(tile, i, j, box, 0 if crop is None else int(crop[i, j]), False)
            if newline:
                self._slot(tile, i, nc, np.zeros(4), -1, True)

    def add_cells(self, tile: int, x: tuple[np.ndarray, np.ndarray],
                  y: tuple[np.ndarray, np.ndarray], row0: int = 0, col0: int = 0,
                  crop: int = 0) -> None:
        """Append one crop's cells in raster order as the block at (row0, col0) of a grid
        stitched from several crops (the caller records the whole grid in `grids`)."""
        (x0, x1), (y0, y1) = x, y
        for i in range(len(y0)):
            for j in range(len(x0)):
                box = np.array([x0[j], y0[i], x1[j], y1[i]], dtype=np.float64)
                self._slot(tile, row0 + i, col0 + j, box, crop, False)

    def _slot(self, tile, row, col, box, crop, is_newline) -> None:
        self.tile.append(tile)
        self.row.append(row)
        self.col.append(col)
        self.boxes.append(box)
        self.crop.append(crop)
        self.newline.append(is_newline)

    def __len__(self) -> int:
        return len(self.tile)


def size_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge", "longest_edge",
                                          "max_height", "max_width") if getattr(size, k, None)}


def resize_output(hw: tuple[int, int], size) -> tuple[int, int]:
    """(height, width) the PIL/torch backends' `resize` produces for `size` (same branches)."""
    from transformers.image_transforms import (
        get_resize_output_image_size,
        get_size_with_aspect_ratio,
    )

    s = size_dict(size)
    h, w = hw
    if s.get("shortest_edge") and s.get("longest_edge"):
        return tuple(get_size_with_aspect_ratio((h, w), s["shortest_edge"], s["longest_edge"]))
    if s.get("shortest_edge"):
        dummy = np.zeros((1, h, w), dtype=np.uint8)
        return tuple(get_resize_output_image_size(dummy, size=s["shortest_edge"],
                                                  default_to_square=False,
                                                  input_data_format="channels_first"))
    if s.get("height") and s.get("width"):
        return (s["height"], s["width"])
    raise ValueError(f"unsupported image processor size {s}; expected height/width or "
                     "shortest_edge")


def crop_offset(orig: int, crop: int) -> int:
    """How many pixels `center_crop` removes before the crop (negative: it pads)."""
    if crop <= orig:
        return (orig - crop) // 2
    return -math.ceil((crop - orig) / 2)


def patch_chain(ip, hw: tuple[int, int], ax: Axis, ay: Axis) -> tuple[tuple[int, int], Axis, Axis]:
    """Per-tile resize + center crop as the LLaVA-style `_preprocess` loops do."""
    h, w = hw
    if getattr(ip, "do_resize", False) and ip.size:
        nh, nw = resize_output((h, w), ip.size)
        ax, ay = ax.then_resize(nw / w), ay.then_resize(nh / h)
        h, w = nh, nw
    if getattr(ip, "do_center_crop", False) and ip.crop_size:
        crop = size_dict(ip.crop_size)
        ch, cw = crop["height"], crop["width"]
        ax, ay = ax.then_shift(-crop_offset(w, cw)), ay.then_shift(-crop_offset(h, ch))
        h, w = ch, cw
    return (h, w), ax, ay


def patches(n: int, patch: int, axis: Axis) -> tuple[np.ndarray, np.ndarray]:
    """Original-pixel extent of the first n conv patches of a processed image (axis: orig -> it)."""
    k = np.arange(n)
    return axis.to_original(k * patch), axis.to_original((k + 1) * patch)


def bilinear(k: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first source, second source, weight of the second) of each of `out` bilinear samples."""
    s = np.maximum((np.arange(out) + 0.5) * (k / out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(s).astype(int), k - 1)
    return i0, np.minimum(i0 + 1, k - 1), s - i0


def heavier(k: int, out: int) -> np.ndarray:
    """The source with the larger bilinear weight in each of `out` samples."""
    i0, i1, frac = bilinear(k, out)
    return np.where(frac < 0.5, i0, i1)


def cells(lo: np.ndarray, hi: np.ndarray, n: int, out: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis box edges of `out` cells read from K source patches [lo, hi) on an axis of n px.

    Without a shrink (out == K) a cell's box is its patch clipped to the image.
    A shrink replays `nn.functional.interpolate(mode="bilinear",
    align_corners=False)` as OneVision's `pack_image_features` calls it: cell i
    samples source coordinate s = max((i + 0.5) K / out - 0.5, 0) and blends
    sources floor(s) and floor(s) + 1 with weights 1 - f, f. Its box is centred
    on the centroid of the image pixels the blend sees (each source weighted by
    its blend weight times its image pixels; padding carries no image), and is
    one cell pitch (K / out patches) wide, narrowed symmetrically at the image
    border so that the centre stays that centroid. (The union of the two
    sources would be off-centre by up to half a patch whenever f != 0.5.)
    The rule reduces to the clipped patch when out == K. A cell that sees no
    image pixel gets an empty box at the border it lies beyond.
    """
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    k = len(lo)
    out = k if out is None else out
    ratio = k / out
    i0, i1, frac = bilinear(k, out)
    a, b = np.clip(lo, 0, n), np.clip(hi, 0, n)
    seen = np.maximum(b - a, 0.0)
    mid = (a + b) / 2
    w0, w1 = (1 - frac) * seen[i0], frac * seen[i1]
    total = w0 + w1
    nominal = (1 - frac) * (lo[i0] + hi[i0]) / 2 + frac * (lo[i1] + hi[i1]) / 2
    centre = np.where(total > 0, (w0 * mid[i0] + w1 * mid[i1]) / np.where(total > 0, total, 1),
                      np.clip(nominal, 0, n))
    half = np.minimum.reduce([ratio * (hi[i0] - lo[i0]) / 2, centre, n - centre])
    half = np.where(total > 0, half, 0.0)
    return centre - half, centre + half
