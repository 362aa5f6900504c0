"""Processors of video-capable families without torchvision.

LLaVA-OneVision, Qwen2.5-VL and InternVL processors insist on a video processor,
and every video processor in transformers needs torchvision. vislens only feeds
images, so a stand-in video processor (which refuses videos loudly) and a
processor subclass that skips the class check for it let the real image
processors and tokenizers run unchanged. Pixtral's processor module imports
torchvision for one size helper; `pixtral_processor` imports it without.
"""

from __future__ import annotations

from functools import cache


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


class NoVideoProcessor:
    """Placeholder video processor: images only (install torchvision for videos)."""

    merge_size = 2
    temporal_patch_size = 2
    _auto_class = None

    def __call__(self, *args, **kwargs):
        raise ValueError("vislens feeds images only; install torchvision to process videos")

    def to_dict(self) -> dict:
        return {}

    def save_pretrained(self, *args, **kwargs) -> list:
        return []


@cache
def images_only(processor_cls: type) -> type:
    """`processor_cls` accepting a NoVideoProcessor (same name, so saved configs stay valid)."""

    def check(self, name, arg):
        if name == "video_processor" and isinstance(arg, NoVideoProcessor):
            return NoVideoProcessor
        return processor_cls.check_argument_for_proper_class(self, name, arg)

    attrs = {"check_argument_for_proper_class": check}
    return type(processor_cls.__name__, (processor_cls,), attrs)


def pixtral_processor() -> type:
    """PixtralProcessor, importable without torchvision.

    Its module takes one size helper from the torchvision image processor module
    and nothing else; where torchvision is missing, that module is stood in for by
    one holding the same helper from the PIL image processor (the same arithmetic)
    while the processor module is imported, and removed again, so nothing else
    ever sees it. The processor class itself runs unchanged.
    """
    import sys
    import types

    name = "transformers.models.pixtral.image_processing_pixtral"
    if torchvision_available() or name in sys.modules:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor

        return PixtralProcessor
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    stand_in = types.ModuleType(name)
    stand_in.get_resize_output_image_size = pil.get_resize_output_image_size
    sys.modules[name] = stand_in
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    finally:
        del sys.modules[name]
    return PixtralProcessor
