"""Qwen2-VL (`qwen2_vl`): Qwen2.5-VL's image geometry (14-px patches merged 2x2, each side a
multiple of 28) with a vision tower that attends globally in every block (no windows, which
only change the vision tower, not where a token's pixels are); mRoPE positions from the grid."""

from __future__ import annotations

from vislens.models.families.qwen2_5_vl import Qwen25VL
from vislens.models.families.registry import register


@register
class Qwen2VL(Qwen25VL):
    model_type = "qwen2_vl"
    label = "Qwen2-VL"
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
