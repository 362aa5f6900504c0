"""The anyres geometry LLaVA-NeXT and LLaVA-OneVision share: a base view of the whole image
plus a high-res view stitched from crops of the best pinpoint, unpadded, each row closed
by a newline token (OneVision also shrinks large grids bilinearly: anyres_max_N)."""

from __future__ import annotations

import math

import numpy as np
import torch

from vislens.models.geometry import (
    Axis,
    Layout,
    cells,
    heavier,
    patch_chain,
    patches,
    size_dict,
)


def _tile_size(ip) -> int:
    """Side of the square crops the anyres processors cut (their `_preprocess` rule)."""
    crop, size = size_dict(ip.crop_size), size_dict(ip.size)
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

    base_view(lay, ip, vision)

    # high-res view: aspect-preserving resize into the best pinpoint, centered padding,
    # crops of `side` px each put through the same per-patch chain
    bh, bw = select_best_resolution((h, w), pins)
    dummy = np.zeros((1, h, w), dtype=np.uint8)
    nh, nw = get_patch_output_size(dummy, (bh, bw), input_data_format="channels_first")
    px, py = Axis(nw / w, (bw - nw) // 2), Axis(nh / h, (bh - nh) // 2)
    side = _tile_size(ip)
    (th, tw), tx, ty = patch_chain(ip, (side, side), Axis(), Axis())
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

    y = cells(*stitched(r0, kr, ty, py), h, fr)
    x = cells(*stitched(c0, kc, tx, px), w, fc)
    row, col = r0 + heavier(kr, fr), c0 + heavier(kc, fc)
    crop = (row[:, None] // g) * npw + (col[None, :] // g) + 1
    lay.add_grid(1, x, y, crop=crop, newline=True)
    return lay


def base_view(lay: Layout, ip, vision) -> None:
    """Tile 0 of NeXT / OneVision: the whole image stretched to the processor's size tuple,
    then the per-patch chain."""
    w, h = lay.image_size
    patch = vision.patch_size
    g = vision.image_size // patch
    size = size_dict(ip.size)
    sh, sw = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    ax, ay = Axis(sw / w), Axis(sh / h)
    (fh, fw), ax, ay = patch_chain(ip, (sh, sw), ax, ay)
    if (fh, fw) != (vision.image_size, vision.image_size):
        raise ValueError(f"anyres base view is {(fh, fw)} px, vision tower expects "
                         f"{vision.image_size}; unsupported processor settings")
    lay.add_grid(0, cells(*patches(g, patch, ax), w), cells(*patches(g, patch, ay), h))
