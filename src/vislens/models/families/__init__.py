"""One module per model family (see base.Family); `family_for` picks it from config.json.

Adding a family = adding a module here with a `@register`-ed Family subclass, and its
test: every module of this folder is imported below, so nothing else is edited. A model
type without one loads through the generic fallback (positions only).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from vislens.models.families.base import Family
from vislens.models.families.generic import Generic, refuse_cross_attention
from vislens.models.families.registry import FAMILIES, register, supported


def import_all() -> tuple[ModuleType, ...]:
    """Import every module of this package's folder, which registers its families: what
    makes a new module enough (a module already imported is not run again)."""
    return tuple(importlib.import_module(f"{__name__}.{info.name}")
                 for info in pkgutil.iter_modules(__path__))


MODULES = import_all()
SUPPORTED = supported()  # as imported; error messages call supported() for the current list


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
                           f"transformers; vislens supports {supported()}, and any other "
                           "image-text-to-text model without a token layout")
    return Generic(model_type)


__all__ = ["FAMILIES", "MODULES", "SUPPORTED", "Family", "Generic", "family_for", "import_all",
           "register", "supported"]
