"""Gemma 3 (`gemma3`): SigLIP-896/14 on the whole image stretched to 896x896, its 64x64 patches
average-pooled 4x4 into 16x16 = 256 tokens (`mm_tokens_per_image`), each token 56x56
processed pixels; with pan-and-scan on, the image is also cut into 2-4 crops along its long
side, each stretched to 896x896 and read the same way (tile 0 = whole image, tiles 1.. =
crops, in the processor's order, which is the sequence order).

Image tokens attend to every token of their own image bidirectionally (a token-type mask
transformers builds); knockout and capture act on top of whatever mask the model built, so
they compose with it (vislens.interventions.attention_function).
"""

from __future__ import annotations

import numpy as np

from vislens.models.families.base import Family, regroup_views
from vislens.models.families.registry import register
from vislens.models.geometry import Axis, Layout, cells, patches, size_dict

PAN_AND_SCAN = ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                "pan_and_scan_min_ratio_to_activate")


def pan_and_scan_settings(processor) -> dict:
    """The pan-and-scan settings a processor call applies: the processor's images kwargs
    (Gemma3Processor's class defaults unless `Gemma3.configure` set them), which it passes
    to the image processor explicitly, overriding the image processor's own attributes."""
    ip = processor.image_processor
    given = dict(getattr(processor, "images_kwargs", {}) or {})
    return {k: given[k] if given.get(k) is not None else getattr(ip, k, None)
            for k in PAN_AND_SCAN}


def crop_windows(ip, settings: dict, image_size: tuple[int, int]
                 ) -> list[tuple[int, int, int, int]]:
    """(x0, y0, width, height) in original pixels of each pan-and-scan crop, in processor order.

    The image processor's own `pan_and_scan` cuts index images whose pixels hold their x
    (then y) coordinate, so the crops are those it cuts, edge crops cut short included.
    """
    if not settings.get("do_pan_and_scan"):
        return []
    w, h = image_size
    args = {k: settings[k] for k in PAN_AND_SCAN[1:]}
    xs = ip.pan_and_scan(np.broadcast_to(np.arange(w)[None, None, :], (1, h, w)), **args)
    ys = ip.pan_and_scan(np.broadcast_to(np.arange(h)[None, :, None], (1, h, w)), **args)
    return [(int(cx[0, 0, 0]), int(cy[0, 0, 0]), cx.shape[2], cx.shape[1])
            for cx, cy in zip(xs, ys, strict=True)]


def gemma3_layout(ip, settings: dict, config, image_size: tuple[int, int]) -> Layout:
    """Tile 0: the whole image; tiles 1..n: its pan-and-scan crops. Each view is stretched to
    the processor's size and read as a side x side grid of pooled cells."""
    w, h = image_size
    size = size_dict(ip.size)
    sh, sw = size["height"], size["width"]
    vision = config.vision_config
    patches_per_side = vision.image_size // vision.patch_size
    side = int(round(config.mm_tokens_per_image ** 0.5))
    if (sh, sw) != (vision.image_size, vision.image_size) or patches_per_side % side \
            or side * side != config.mm_tokens_per_image:
        raise ValueError(f"Gemma 3 processor size {sw}x{sh} with {vision.image_size}-px vision "
                         f"input and {config.mm_tokens_per_image} tokens per image: unsupported "
                         "settings")
    cell = (patches_per_side // side) * vision.patch_size  # processed px per pooled token
    lay = Layout(image_size)
    views = [(0, 0, w, h), *crop_windows(ip, settings, image_size)]
    for tile, (x0, y0, cw, ch) in enumerate(views):
        ax = Axis(sw / cw, -x0 * sw / cw)
        ay = Axis(sh / ch, -y0 * sh / ch)
        lay.add_grid(tile, cells(*patches(side, cell, ax), w), cells(*patches(side, cell, ay), h),
                     crop=np.full((side, side), tile))
    return lay


@register
class Gemma3(Family):
    model_type = "gemma3"
    label = "Gemma 3"
    model_class = "Gemma3ForConditionalGeneration"
    processor_class = "Gemma3Processor"
    multi_image = True

    def configure(self, processor) -> None:
        """Honour pan-and-scan settings saved with the image processor
        (preprocessor_config.json): Gemma3Processor passes its own class defaults (off)
        explicitly on every call, which would otherwise override them."""
        ip = getattr(processor, "image_processor", None)
        saved = {k: getattr(ip, k, None) for k in PAN_AND_SCAN}
        saved = {k: v for k, v in saved.items() if v is not None}
        if saved:
            processor.images_kwargs = {**(getattr(processor, "images_kwargs", {}) or {}),
                                       **saved}

    def layouts(self, vlm, images, inputs):
        ip = vlm.processor.image_processor
        settings = pan_and_scan_settings(vlm.processor)
        return [[gemma3_layout(ip, settings, vlm.config, im.size) for im in ims]
                for ims in images]

    def split_features(self, out, batch):
        """The processor's views ([views, 256, hidden]: every image's whole view, then its
        crops) regrouped per image, as many rows as the image has tokens."""
        return regroup_views(out.pooler_output, batch, "Gemma 3")

    def projector_inputs(self, x, y):
        """Per pooled token, the mean of the 4x4 vision patches its average pool reads (the
        vision feature the projector then normalises and projects)."""
        n, p2, d = x.shape
        side = int(round(y.shape[1] ** 0.5))
        per = int(round(p2 ** 0.5))
        k = per // side
        grid = x.reshape(n, side, k, side, k, d).float().mean((2, 4))
        return grid.reshape(n * side * side, d).to(x.dtype)

    def native_image_size(self, vlm) -> str:
        side = vlm.config.vision_config.image_size
        pas = pan_and_scan_settings(vlm.processor)
        crops = (f" + up to {pas['pan_and_scan_max_num_crops']} pan-and-scan crops"
                 if pas.get("do_pan_and_scan") else " (pan-and-scan off)")
        return f"{side}x{side}{crops}"
