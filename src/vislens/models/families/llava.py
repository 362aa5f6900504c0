"""LLaVA-1.5 (`llava`): CLIP-L/14 at 336 px, a fixed 24x24 grid after resize + center crop."""

from __future__ import annotations

from vislens.models.families.base import Family
from vislens.models.families.registry import register
from vislens.models.geometry import Axis, Layout, cells, patch_chain, patches


def llava_layout(ip, image_size: tuple[int, int], patch: int, processed_hw: tuple[int, int]
                 ) -> Layout:
    """Optional pad-to-square, resize, center crop, one raster grid (tile 0)."""
    w, h = image_size
    ax, ay = Axis(), Axis()
    cur = (h, w)
    if getattr(ip, "do_pad", False):
        m = max(w, h)
        ax = ax.then_shift((m - w) // 2 if w < h else 0)
        ay = ay.then_shift((m - h) // 2 if h < w else 0)
        cur = (m, m)
    (fh, fw), ax, ay = patch_chain(ip, cur, ax, ay)
    if (fh, fw) != tuple(processed_hw):
        raise ValueError(f"LLaVA geometry mismatch: replayed {(fh, fw)} but processor gave "
                         f"{tuple(processed_hw)}; unsupported image processor settings")
    lay = Layout(image_size)
    lay.add_grid(0, cells(*patches(fw // patch, patch, ax), w),
                 cells(*patches(fh // patch, patch, ay), h))
    return lay


@register
class Llava(Family):
    model_type = "llava"
    label = "LLaVA-1.5"
    model_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"

    def layouts(self, vlm, images, inputs):
        ip = vlm.processor.image_processor
        hw = tuple(inputs["pixel_values"].shape[-2:])
        patch = vlm.config.vision_config.patch_size
        return [[llava_layout(ip, im.size, patch, hw) for im in ims] for ims in images]
