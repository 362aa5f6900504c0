"""LLaVA-OneVision (`llava_onevision`): SigLIP-384/14 base view + anyres tiles (shrunk past
anyres_max_9); with several images in one prompt each image is its base view only."""

from __future__ import annotations

import numpy as np

from vislens.models.families.anyres import anyres_layout, base_view
from vislens.models.families.base import Family
from vislens.models.families.registry import register
from vislens.models.geometry import Layout


def onevision_multi_layout(ip, config, image_size: tuple[int, int]) -> Layout:
    """OneVision with several images in one prompt: each image is its base view only,
    closed by ONE newline slot (729 + 1 tokens; `batch_num_images` > 1 in transformers)."""
    lay = Layout(image_size)
    base_view(lay, ip, config.vision_config)
    g = lay.grids[0][0]
    lay._slot(0, g - 1, g, np.zeros(4), -1, True)
    return lay


@register
class LlavaOnevision(Family):
    model_type = "llava_onevision"
    label = "LLaVA-OneVision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    processor_class = "LlavaOnevisionProcessor"
    multi_image = True
    video_processor = True

    def layouts(self, vlm, images, inputs):
        ip, cfg = vlm.processor.image_processor, vlm.config
        return [[onevision_multi_layout(ip, cfg, im.size) if len(ims) > 1 else
                 anyres_layout(ip, cfg, im.size, onevision=True) for im in ims]
                for ims in images]

    def native_image_size(self, vlm) -> str:
        return super().native_image_size(vlm) + " tiles + base view"
