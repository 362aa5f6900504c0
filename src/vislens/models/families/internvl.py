"""InternVL (`internvl`, e.g. InternVL3-8B-hf): dynamic tiling into the grid of 448-px
tiles whose aspect ratio is closest to the image's (at most `max_patches` tiles), plus a
448-px thumbnail of the whole image when there is more than one tile; InternViT patches
pixel-shuffled 2x2 (downsample_ratio 0.5) into 256 tokens per tile.

The LM reads <img>, every tile's tokens (tiles in raster order, the thumbnail last),
</img>; the two frame tokens are kept apart as the image's markers.
"""

from __future__ import annotations

from vislens.models.families.base import Family, regroup_views
from vislens.models.families.registry import register
from vislens.models.geometry import Axis, Layout, cells, patches, size_dict


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, list | tuple) else (value, value)


def tiling(processor) -> dict:
    """crop_to_patches / min_patches / max_patches as the processor merges them for a call
    (InternVLProcessor turns crop_to_patches on whatever the image processor says)."""
    merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)
    ip, kw = processor.image_processor, merged["images_kwargs"]
    return {k: kw.get(k, getattr(ip, k, None)) for k in ("crop_to_patches", "min_patches",
                                                          "max_patches")}


def internvl_layout(ip, config, image_size: tuple[int, int], crop_to_patches: bool,
                    min_patches: int, max_patches: int) -> Layout:
    """Tiles (tile 1, stitched into one grid; `crop` = 1 + raster index) then the thumbnail
    (tile 0), or one tile 0 when the grid is a single tile.

    Every tile is a plain resize of the original (the tile grid: one resize to
    rows x cols tiles, then cuts; the thumbnail: one resize to the tile size), and
    a token's box is the union of the 2x2 patches it merges.
    """
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas,
    )

    w, h = image_size
    vision = config.vision_config
    (th, tw), (ph, pw) = _pair(vision.image_size), _pair(vision.patch_size)
    size = size_dict(ip.size)
    if (size.get("height"), size.get("width")) != (th, tw) or th // ph != tw // pw:
        raise ValueError(f"InternVL tiles of {size} for a {th}x{tw} vision tower: unsupported "
                         "image processor settings")
    ratio = config.downsample_ratio
    n = int(th // ph * ratio)  # tokens per tile side (32 patches -> 16)
    cell = round(ph / ratio)
    lay = Layout(image_size)
    cols = rows = 1
    if crop_to_patches and max_patches > 1:
        cols, rows = get_optimal_tiled_canvas((h, w), (th, tw), min_patches, max_patches)
    if cols * rows > 1:
        ax, ay = Axis(cols * tw / w), Axis(rows * th / h)
        for r in range(rows):
            y = cells(*patches(n, cell, ay.then_shift(-r * th)), h)
            for c in range(cols):
                x = cells(*patches(n, cell, ax.then_shift(-c * tw)), w)
                lay.add_cells(1, x, y, row0=r * n, col0=c * n, crop=1 + r * cols + c)
        lay.grids[1] = (rows * n, cols * n)
    gx, gy = Axis(tw / w), Axis(th / h)
    lay.add_grid(0, cells(*patches(n, cell, gx), w), cells(*patches(n, cell, gy), h))
    return lay


@register
class InternVL(Family):
    model_type = "internvl"
    label = "InternVL"
    model_class = "InternVLForConditionalGeneration"
    processor_class = "InternVLProcessor"
    multi_image = True
    video_processor = True
    image_open = "<img>"
    image_close = "</img>"

    def split_features(self, out, batch):
        """Its vision pass gives one [views, tokens, hidden] tensor (tiles and thumbnail, or
        one view per image): regrouped per image, handed back in that form."""
        return regroup_views(out.pooler_output, batch, "InternVL")

    def layouts(self, vlm, images, inputs):
        ip, kw = vlm.processor.image_processor, tiling(vlm.processor)
        return [[internvl_layout(ip, vlm.config, im.size, **kw) for im in ims]
                for ims in images]

    def native_image_size(self, vlm) -> str:
        kw = tiling(vlm.processor)
        side = _pair(vlm.config.vision_config.image_size)[0]
        return f"{side}x{side} tiles (up to {kw['max_patches']}) + thumbnail"
