"""Image features in the form a model takes back, shared by vlm.py and the family modules.

It lives apart from vlm.py because families build it (`split_features`) while vlm.py
imports the families: with it in vlm.py the two would import each other.
"""

from __future__ import annotations

import torch


class ImageEmbeddings(list):
    """Post-projector features per image (LM sequence order), in the form the model takes back.

    A list of [n_tokens, hidden] tensors, one per image, so experiments can index an
    image's rows and repeat a one-sample batch's features (`feats * n`). Two families
    need more than that list to skip the vision pass exactly, and it travels with it:
    Qwen3-VL also adds per-layer DeepStack features to the image positions of its
    first decoder layers (`injected[i][l]`: image i, injection layer l), and Gemma 3
    takes its features as one [views, tokens_per_view, hidden] tensor (pan-and-scan
    crops are views of one image; Idefics3, InternVL and PaliGemma likewise).
    """

    def __init__(self, per_image=(), injected: list[list[torch.Tensor]] | None = None,
                 tokens_per_view: int | None = None) -> None:
        super().__init__(per_image)
        self.injected = injected
        self.tokens_per_view = tokens_per_view
        if injected is not None and len(injected) != len(self):
            raise ValueError(f"{len(injected)} injected feature sets for {len(self)} images")

    def _like(self, per_image, injected) -> ImageEmbeddings:
        return ImageEmbeddings(per_image, injected, self.tokens_per_view)

    def __mul__(self, n: int) -> ImageEmbeddings:
        return self._like(list(self) * n, None if self.injected is None else self.injected * n)

    __rmul__ = __mul__

    def __add__(self, other) -> ImageEmbeddings:
        other = other if isinstance(other, ImageEmbeddings) else ImageEmbeddings(other)
        if (self.injected is None) != (other.injected is None):
            raise ValueError("cannot join features with and without injected (DeepStack) parts")
        injected = None if self.injected is None else self.injected + other.injected
        return self._like(list(self) + list(other), injected)

    def encoder_output(self):
        """What `mm_encoder_outputs["image"]` must hold for the model to use these features."""
        if self.tokens_per_view:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            flat = torch.cat(list(self))
            return BaseModelOutputWithPooling(
                pooler_output=flat.view(-1, self.tokens_per_view, flat.shape[-1]))
        if self.injected is not None:
            from transformers.models.qwen3_vl.modeling_qwen3_vl import (
                BaseModelOutputWithDeepstackFeatures,
            )

            layers = len(self.injected[0]) if self.injected else 0
            return BaseModelOutputWithDeepstackFeatures(
                pooler_output=list(self),
                deepstack_features=[tuple(img[layer] for img in self.injected)
                                    for layer in range(layers)])
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=list(self))
