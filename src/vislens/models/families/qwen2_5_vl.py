"""Qwen2.5-VL (`qwen2_5_vl`): dynamic resolution (each side a multiple of 28), 14-px patches
merged 2x2 into one token, mRoPE positions from the image grid."""

from __future__ import annotations

from vislens.models.families.base import Family
from vislens.models.families.registry import register
from vislens.models.geometry import Axis, Layout, cells, patches, size_dict


def qwen_layout(image_size: tuple[int, int], grid_thw, patch: int, merge: int) -> Layout:
    """Stretched to a multiple of patch*merge, merged cells in raster order."""
    w, h = image_size
    t, gh, gw = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"image_grid_thw has t={t}; vislens maps still images only")
    ax, ay = Axis(gw * patch / w), Axis(gh * patch / h)
    cell = patch * merge
    lay = Layout(image_size)
    lay.add_grid(0, cells(*patches(gw // merge, cell, ax), w),
                 cells(*patches(gh // merge, cell, ay), h))
    return lay


@register
class Qwen25VL(Family):
    model_type = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    mrope = True
    multi_image = True
    video_processor = True
    projector = "visual.merger"

    def layouts(self, vlm, images, inputs):
        vc = vlm.config.vision_config
        grids = iter(inputs["image_grid_thw"].tolist())  # one row per image, batch order
        return [[qwen_layout(im.size, next(grids), vc.patch_size, vc.spatial_merge_size)
                 for im in ims] for ims in images]

    def native_image_size(self, vlm) -> str:
        ip = vlm.processor.image_processor
        size = size_dict(getattr(ip, "size", None))
        lo = size.get("shortest_edge") or getattr(ip, "min_pixels", None)
        hi = size.get("longest_edge") or getattr(ip, "max_pixels", None)
        side = lambda px: int(round(px ** 0.5))  # noqa: E731
        return f"dynamic ({side(lo)}x{side(lo)} to {side(hi)}x{side(hi)} px area)"
