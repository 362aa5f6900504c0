"""Mistral 3 (`mistral3`, e.g. Mistral-Small-3.1-24B-Instruct-2503): Pixtral vision at a
variable grid. The image is shrunk (never enlarged) to fit `longest_edge`, then each side
rounded up to whole 28-px cells (14-px patches merged 2x2 by the patch merger); one
[IMG] token per cell in raster order, an [IMG_BREAK] after every row but the last,
which [IMG_END] closes. Breaks and the end token are text, kept apart as the image's
markers.
"""

from __future__ import annotations

import numpy as np

from vislens.models.families.base import Family
from vislens.models.families.registry import register
from vislens.models.geometry import Axis, Layout, cells, patches, size_dict


def pixtral_size(ip, image_size: tuple[int, int], cell: int) -> tuple[int, int]:
    """(height, width) the Pixtral processor resizes an image to (its own function)."""
    from transformers.image_utils import ChannelDimension
    from transformers.models.pixtral.image_processing_pil_pixtral import (
        get_resize_output_image_size,
    )

    w, h = image_size
    size = size_dict(ip.size)
    longest = size.get("longest_edge")
    bound = (longest, longest) if longest else (size["height"], size["width"])
    return get_resize_output_image_size(np.zeros((1, h, w), dtype=np.uint8), size=bound,
                                        patch_size=(cell, cell),
                                        input_data_format=ChannelDimension.FIRST)


def mistral3_layout(ip, config, image_size: tuple[int, int], processed_hw) -> Layout:
    """One grid (tile 0) of merged cells over the whole image, stretched to whole cells."""
    w, h = image_size
    cell = config.vision_config.patch_size * config.spatial_merge_size
    if not ip.do_resize:
        raise ValueError("Mistral 3 without do_resize: unsupported image processor setting")
    hh, ww = pixtral_size(ip, image_size, cell)
    if (hh, ww) != tuple(processed_hw):
        raise ValueError(f"Mistral 3 geometry mismatch: replayed {(hh, ww)} but the processor "
                         f"gave {tuple(processed_hw)}; unsupported image processor settings")
    lay = Layout(image_size)
    lay.add_grid(0, cells(*patches(ww // cell, cell, Axis(ww / w)), w),
                 cells(*patches(hh // cell, cell, Axis(hh / h)), h))
    return lay


@register
class Mistral3(Family):
    model_type = "mistral3"
    label = "Mistral 3 (Pixtral vision)"
    model_class = "Mistral3ForConditionalGeneration"
    processor_class = "PixtralProcessor"
    multi_image = True
    torchvision_processor = True
    # the projector norms the raster patches and merges 2x2 blocks itself; its merging
    # layer reads them grouped, one row per image token
    projector_input = "multi_modal_projector.patch_merger.merging_layer"
    image_close = "[IMG_END]"
    # the hub's tokenizer.json splits words with a regex that differs from the one Mistral
    # trained with (mistral-common); transformers swaps in the right one on request
    tokenizer_kwargs = {"fix_mistral_regex": True}

    def processor_type(self) -> type:
        from vislens.models.novideo import pixtral_processor

        return pixtral_processor()

    def layouts(self, vlm, images, inputs):
        ip = vlm.processor.image_processor
        sizes = iter(inputs["image_sizes"].tolist())  # one (height, width) per image
        return [[mistral3_layout(ip, vlm.config, im.size, next(sizes)) for im in ims]
                for ims in images]

    def native_image_size(self, vlm) -> str:
        longest = size_dict(vlm.processor.image_processor.size).get("longest_edge")
        return f"variable grid of 28-px cells (longest side up to {longest} px)"
