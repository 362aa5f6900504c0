"""Qwen3-VL (`qwen3_vl`): 16-px patches merged 2x2 (32-px cells, each side a multiple of 32),
mRoPE positions from the image grid, and DeepStack: features taken from several vision
blocks, each through its own merger, are ADDED to the image positions of the LM's first
decoder layers (after layer l for the l-th), so the image reaches the LM at more places
than its input embeddings. `deepstack` tells vislens.interventions.ablate to replace those
additions at the ablated positions too."""

from __future__ import annotations

from vislens.models.embeddings import ImageEmbeddings
from vislens.models.families.qwen2_5_vl import Qwen25VL
from vislens.models.families.registry import register


@register
class Qwen3VL(Qwen25VL):
    model_type = "qwen3_vl"
    label = "Qwen3-VL"
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    deepstack = True

    def split_features(self, out, batch):
        """Per image: its merged features, and its DeepStack features per injection layer
        (`get_image_features` splits both per image, layer by layer)."""
        per_image = [f.detach() for f in out.pooler_output]
        layers = [[f.detach() for f in layer] for layer in out.deepstack_features]
        injected = [[layer[i] for layer in layers] for i in range(len(per_image))]
        return ImageEmbeddings(per_image, injected)
