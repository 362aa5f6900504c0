"""Processors of video-capable families without torchvision.

LLaVA-OneVision and Qwen2.5-VL processors insist on a video processor, and
every video processor in transformers needs torchvision. vislens only feeds
images, so a stand-in video processor (which refuses videos loudly) and a
processor subclass that skips the class check for it let the real image
processors and tokenizers run unchanged.
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
