"""LLaVA-NeXT (`llava_next`, e.g. llama3-llava-next-8b-hf): base view + anyres tiles at
336 px (CLIP-L/14), unpadded, one newline token after each high-res row."""

from __future__ import annotations

from vislens.models.families.anyres import anyres_layout
from vislens.models.families.base import Family
from vislens.models.families.registry import register


@register
class LlavaNext(Family):
    model_type = "llava_next"
    label = "LLaVA-NeXT"
    model_class = "LlavaNextForConditionalGeneration"
    processor_class = "LlavaNextProcessor"

    def layouts(self, vlm, images, inputs):
        ip = vlm.processor.image_processor
        return [[anyres_layout(ip, vlm.config, im.size, onevision=False) for im in ims]
                for ims in images]

    def native_image_size(self, vlm) -> str:
        return super().native_image_size(vlm) + " tiles + base view"
