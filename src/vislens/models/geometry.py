"""Where each image token of each family comes from in the ORIGINAL image.

Every function replays the image processor's own steps (pad, resize, crop,
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
see `_cells`.

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


def _patches(n: int, patch: int, axis: Axis) -> tuple[np.ndarray, np.ndarray]:
    """Original-pixel extent of the first n conv patches of a processed image (axis: orig -> it)."""
    k = np.arange(n)
    return axis.to_original(k * patch), axis.to_original((k + 1) * patch)


def _bilinear(k: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first source, second source, weight of the second) of each of `out` bilinear samples."""
    s = np.maximum((np.arange(out) + 0.5) * (k / out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(s).astype(int), k - 1)
    return i0, np.minimum(i0 + 1, k - 1), s - i0


def _heavier(k: int, out: int) -> np.ndarray:
    """The source with the larger bilinear weight in each of `out` samples."""
    i0, i1, frac = _bilinear(k, out)
    return np.where(frac < 0.5, i0, i1)


def _cells(lo: np.ndarray, hi: np.ndarray, n: int, out: int | None = None
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
    i0, i1, frac = _bilinear(k, out)
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
    lay = Layout(image_size)
    lay.add_grid(0, _cells(*_patches(fw // patch, patch, ax), w),
                 _cells(*_patches(fh // patch, patch, ay), h))
    return lay


def _tile_size(ip) -> int:
    """Side of the square crops the anyres processors cut (their `_preprocess` rule)."""
    crop, size = _size_dict(ip.crop_size), _size_dict(ip.size)
    return crop.get("height") or size.get("height") or size["shortest_edge"]


def anyres_layout(ip, config, image_size: tuple[int, int], onevision: bool) -> Layout:
    """LLaVA-NeXT / OneVision: base view (tile 0) + stitched high-res view (tile 1).

    Tile 1 is the anyres crops stitched as the LM reads them: unpadded, (for
    OneVision) bilinearly shrunk when larger than anyres_max_N, and each row
    closed by a newline slot. `crop` says which processor crop a cell came from
    (for a shrunk cell, its heavier bilinear source).

    Stitched row R is patch R % g of crop row R // g: its pixels start at the
    crop's origin, so where g * patch < crop side (OneVision: 27 x 14 = 378 of
    384) consecutive crops leave a gap that no token sees, and `unpad_image`,
    which counts in whole patches, can keep a row of padding or drop a row that
    still holds image.
    """
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    w, h = image_size
    vision = config.vision_config
    patch = vision.patch_size
    g = vision.image_size // patch
    pins = config.image_grid_pinpoints
    lay = Layout(image_size)

    _base_view(lay, ip, vision)

    # high-res view: aspect-preserving resize into the best pinpoint, centered padding,
    # crops of `side` px each put through the same per-patch chain
    bh, bw = select_best_resolution((h, w), pins)
    dummy = np.zeros((1, h, w), dtype=np.uint8)
    nh, nw = get_patch_output_size(dummy, (bh, bw), input_data_format="channels_first")
    px, py = Axis(nw / w, (bw - nw) // 2), Axis(nh / h, (bh - nh) // 2)
    side = _tile_size(ip)
    (th, tw), tx, ty = _patch_chain(ip, (side, side), Axis(), Axis())
    nph, npw = get_anyres_image_grid_shape((h, w), pins, vision.image_size)
    if (th, tw) != (vision.image_size, vision.image_size) or (nph * side, npw * side) != (bh, bw):
        raise ValueError(f"anyres crops of {side} px become {(th, tw)} px in a {nph}x{npw} grid "
                         f"over {(bh, bw)}; the model expects {vision.image_size} px crops; "
                         "unsupported processor settings")
    rows_all, cols_all = nph * g, npw * g
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

    def stitched(first: int, n: int, tile_axis: Axis, pad_axis: Axis):
        idx = first + np.arange(n)
        k = idx % g
        crop_origin = (idx // g) * side
        lo = crop_origin + tile_axis.to_original(k * patch)
        hi = crop_origin + tile_axis.to_original((k + 1) * patch)
        return pad_axis.to_original(lo), pad_axis.to_original(hi)

    y = _cells(*stitched(r0, kr, ty, py), h, fr)
    x = _cells(*stitched(c0, kc, tx, px), w, fc)
    row, col = r0 + _heavier(kr, fr), c0 + _heavier(kc, fc)
    crop = (row[:, None] // g) * npw + (col[None, :] // g) + 1
    lay.add_grid(1, x, y, crop=crop, newline=True)
    return lay


def _base_view(lay: Layout, ip, vision) -> None:
    """Tile 0 of NeXT / OneVision: the whole image stretched to the processor's size tuple,
    then the per-patch chain."""
    w, h = lay.image_size
    patch = vision.patch_size
    g = vision.image_size // patch
    size = _size_dict(ip.size)
    sh, sw = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    ax, ay = Axis(sw / w), Axis(sh / h)
    (fh, fw), ax, ay = _patch_chain(ip, (sh, sw), ax, ay)
    if (fh, fw) != (vision.image_size, vision.image_size):
        raise ValueError(f"anyres base view is {(fh, fw)} px, vision tower expects "
                         f"{vision.image_size}; unsupported processor settings")
    lay.add_grid(0, _cells(*_patches(g, patch, ax), w), _cells(*_patches(g, patch, ay), h))


def onevision_multi_layout(ip, config, image_size: tuple[int, int]) -> Layout:
    """OneVision with several images in one prompt: each image is its base view only,
    closed by ONE newline slot (729 + 1 tokens; `batch_num_images` > 1 in transformers)."""
    lay = Layout(image_size)
    _base_view(lay, ip, config.vision_config)
    g = lay.grids[0][0]
    lay._slot(0, g - 1, g, np.zeros(4), -1, True)
    return lay


def qwen_layout(image_size: tuple[int, int], grid_thw, patch: int, merge: int) -> Layout:
    """Qwen2.5-VL: stretched to a multiple of patch*merge, merged cells in raster order."""
    w, h = image_size
    t, gh, gw = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"image_grid_thw has t={t}; vislens maps still images only")
    ax, ay = Axis(gw * patch / w), Axis(gh * patch / h)
    cell = patch * merge
    lay = Layout(image_size)
    lay.add_grid(0, _cells(*_patches(gw // merge, cell, ax), w),
                 _cells(*_patches(gh // merge, cell, ay), h))
    return lay
