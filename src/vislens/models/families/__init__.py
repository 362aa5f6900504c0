"""One module per model family (see base.Family); `family_for` picks it from config.json.

Adding a family = adding a module with a Family subclass and its test; a model type
without one loads through the generic fallback (positions only).
"""

from __future__ import annotations

from vislens.models.families import (
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    mistral3,
    paligemma,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
)
from vislens.models.families.base import Family
from vislens.models.families.generic import Generic, refuse_cross_attention

FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in (
    llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl, gemma3,
    idefics3, internvl, mistral3, paligemma)}
SUPPORTED = ", ".join(f"{f.label} ({name})" for name, f in FAMILIES.items())


def family_for(model_type: str | None) -> Family:
    """The family of a model type: its module, else the generic fallback for any
    image-text-to-text model transformers knows, else one line saying what is supported."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT,
    )

    refuse_cross_attention(str(model_type))
    if model_type not in IMAGE_TEXT:
        raise ValueError(f"{model_type!r} is not an image-text-to-text model type of "
                           f"transformers; vislens supports {SUPPORTED}, and any other "
                           "image-text-to-text model without a token layout")
    return Generic(model_type)


__all__ = ["FAMILIES", "SUPPORTED", "Family", "Generic", "family_for"]
