"""Where each image token of each family comes from in the ORIGINAL image.

Every function replays the image processor's own steps (pad, resize, crop,
anyres tiling, unpadding, 2x2 merge) as per-axis affine maps, using the
transformers functions the processors and models call themselves
(`select_best_resolution`, `get_patch_output_size`, `get_anyres_image_grid_shape`,
`unpad_image`, `get_resize_output_image_size`), so the map follows the library
rather than a re-derivation of it.

A layout is the list of image-token slots of one image in LM sequence order:
patches (with tile, row, col, crop and a pixel box) and newline slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


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

    def add_grid(self, tile: int, rows: np.ndarray, cols: np.ndarray, x: np.ndarray,
                 y: np.ndarray, crop: np.ndarray | None = None, newline: bool = False) -> None:
        """Append a raster grid; x/y hold the cell edges in original pixels (len cols+1, rows+1)."""
        w, h = self.image_size
        nr, nc = len(rows), len(cols)
        self.grids[tile] = (nr, nc)
        for i in range(nr):
            for j in range(nc):
                box = np.array([x[j], y[i], x[j + 1], y[i + 1]], dtype=np.float64)
                box[[0, 2]] = np.clip(box[[0, 2]], 0, w)
                box[[1, 3]] = np.clip(box[[1, 3]], 0, h)
                self._slot(tile, i, j, box, 0 if crop is None else int(crop[i, j]), False)
            if newline:
                self._slot(tile, i, nc, np.zeros(4), -1, True)

    def _slot(self, tile, row, col, box, crop, is_newline) -> None:
        self.tile.append(tile)
        self.row.append(row)
        self.col.append(col)
        self.boxes.append(box)
        self.crop.append(crop)
        self.newline.append(is_newline)

    def __len__(self) -> int:
        return len(self.tile)


def _size_dict(size) -> dict:
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

    s = _size_dict(size)
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


def _patch_chain(ip, hw: tuple[int, int], ax: Axis, ay: Axis) -> tuple[tuple[int, int], Axis, Axis]:
    """Per-tile resize + center crop as the LLaVA-style `_preprocess` loops do."""
    h, w = hw
    if getattr(ip, "do_resize", False) and ip.size:
        nh, nw = resize_output((h, w), ip.size)
        ax, ay = ax.then_resize(nw / w), ay.then_resize(nh / h)
        h, w = nh, nw
    if getattr(ip, "do_center_crop", False) and ip.crop_size:
        crop = _size_dict(ip.crop_size)
        ch, cw = crop["height"], crop["width"]
        ax, ay = ax.then_shift(-crop_offset(w, cw)), ay.then_shift(-crop_offset(h, ch))
        h, w = ch, cw
    return (h, w), ax, ay


def _edges(n: int, cell: float, axis: Axis, start: float = 0.0) -> np.ndarray:
    return axis.to_original(start + np.arange(n + 1) * cell)


def llava_layout(ip, image_size: tuple[int, int], patch: int, processed_hw: tuple[int, int]
                 ) -> Layout:
    """LLaVA-1.5: optional pad-to-square, resize, center crop, one raster grid (tile 0)."""
    w, h = image_size
    ax, ay = Axis(), Axis()
    cur = (h, w)
    if getattr(ip, "do_pad", False):
        m = max(w, h)
        ax = ax.then_shift((m - w) // 2 if w < h else 0)
        ay = ay.then_shift((m - h) // 2 if h < w else 0)
        cur = (m, m)
    (fh, fw), ax, ay = _patch_chain(ip, cur, ax, ay)
    if (fh, fw) != tuple(processed_hw):
        raise ValueError(f"LLaVA geometry mismatch: replayed {(fh, fw)} but processor gave "
                         f"{tuple(processed_hw)}; unsupported image processor settings")
    gh, gw = fh // patch, fw // patch
    lay = Layout(image_size)
    lay.add_grid(0, np.arange(gh), np.arange(gw), _edges(gw, patch, ax), _edges(gh, patch, ay))
    return lay


def anyres_layout(ip, config, image_size: tuple[int, int], onevision: bool) -> Layout:
    """LLaVA-NeXT / OneVision: base view (tile 0) + stitched high-res view (tile 1).

    Tile 1 is the anyres crops stitched as the LM reads them: unpadded, (for
    OneVision) bilinearly shrunk when larger than anyres_max_N, and each row
    closed by a newline slot. `crop` says which processor crop a cell came from.
    """
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    w, h = image_size
    vision = config.vision_config
    g = vision.image_size // vision.patch_size
    pins = config.image_grid_pinpoints
    lay = Layout(image_size)

    # base view: stretched to the processor's size tuple, then the per-patch chain
    size = _size_dict(ip.size)
    sh, sw = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    ax, ay = Axis(sw / w), Axis(sh / h)
    (fh, fw), ax, ay = _patch_chain(ip, (sh, sw), ax, ay)
    if (fh, fw) != (vision.image_size, vision.image_size):
        raise ValueError(f"anyres base view is {(fh, fw)} px, vision tower expects "
                         f"{vision.image_size}; unsupported processor settings")
    cell = fh / g
    lay.add_grid(0, np.arange(g), np.arange(g), _edges(g, cell, ax), _edges(g, cell, ay))

    # high-res view: aspect-preserving resize into the best pinpoint, centered padding
    bh, bw = select_best_resolution((h, w), pins)
    dummy = np.zeros((1, h, w), dtype=np.uint8)
    nh, nw = get_patch_output_size(dummy, (bh, bw), input_data_format="channels_first")
    ax = Axis(nw / w, (bw - nw) // 2)
    ay = Axis(nh / h, (bh - nh) // 2)
    nph, npw = get_anyres_image_grid_shape((h, w), pins, vision.image_size)
    rows_all, cols_all = nph * g, npw * g
    cell = vision.patch_size * (bh / (nph * vision.image_size))  # == patch size in padded px
    index = torch.arange(rows_all * cols_all).view(1, rows_all, cols_all)
    kept = unpad_image(index, torch.tensor([h, w]))[0]
    r0, c0 = int(kept[0, 0]) // cols_all, int(kept[0, 0]) % cols_all
    kr, kc = kept.shape
    fr, fc = kr, kc
    if onevision:
        max_patches = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(kr * kc / (max_patches * g**2))
        if ratio > 1.1:
            fr, fc = int(kr // ratio), int(kc // ratio)
    # final cell i covers stitched rows r0 + [i*kr/fr, (i+1)*kr/fr)
    ry = r0 + np.arange(fr + 1) * (kr / fr)
    cx = c0 + np.arange(fc + 1) * (kc / fc)
    y = ay.to_original(ry * cell)
    x = ax.to_original(cx * cell)
    centre_r = np.floor((ry[:-1] + ry[1:]) / 2).astype(int)
    centre_c = np.floor((cx[:-1] + cx[1:]) / 2).astype(int)
    crop = (centre_r[:, None] // g) * npw + (centre_c[None, :] // g) + 1
    lay.add_grid(1, np.arange(fr), np.arange(fc), x, y, crop=crop, newline=True)
    return lay


def qwen_layout(image_size: tuple[int, int], grid_thw, patch: int, merge: int) -> Layout:
    """Qwen2.5-VL: stretched to a multiple of patch*merge, merged cells in raster order."""
    w, h = image_size
    t, gh, gw = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"image_grid_thw has t={t}; vislens maps still images only")
    ax, ay = Axis(gw * patch / w), Axis(gh * patch / h)
    rows, cols = gh // merge, gw // merge
    lay = Layout(image_size)
    cell = patch * merge
    lay.add_grid(0, np.arange(rows), np.arange(cols), _edges(cols, cell, ax),
                 _edges(rows, cell, ay))
    return lay
