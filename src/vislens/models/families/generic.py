"""Any image-text-to-text model whose image tokens sit in the LM sequence, without a layout.

transformers puts the image features of most image-text-to-text models into the
language model's input embeddings at `image_token_id` positions, the pattern every
vislens intervention is built on. For a model type with no family module, vislens
finds its decoder by the usual attribute paths and maps each image token to its
position only (image index, running number; no pixel box): experiments that need
only positions run, those that map masks to tokens refuse with one line.
"""

from __future__ import annotations

import numpy as np

from vislens.errors import VislensError
from vislens.models.families.base import Family, regroup_views
from vislens.models.geometry import Layout

DECODER_PATHS = ("model.language_model", "model.text_model", "language_model.model",
                 "model.model")
CROSS_ATTENTION = {"mllama": "Llama 3.2 Vision"}  # image features never enter the sequence


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class Generic(Family):
    geometric = False
    projector = ""

    def __init__(self, model_type: str):
        self.model_type = model_type
        self.label = f"{model_type} (generic: positions only)"

    def decoder(self, model):
        for path in DECODER_PATHS:
            found = _attr(model, path)
            if found is not None and hasattr(found, "layers") and hasattr(found, "norm"):
                return found
        raise VislensError(f"cannot find the text decoder of {type(model).__name__} (tried "
                           f"{', '.join(DECODER_PATHS)}); add a family module in "
                           "vislens/models/families/")

    def lm_head(self, model):
        head = getattr(model, "lm_head", None)
        if head is None:
            raise VislensError(f"{type(model).__name__} has no lm_head; add a family module")
        return head

    def split_features(self, out, batch):
        """Per-image features as the model gave them: a list per image, or one
        [views, tokens, hidden] tensor handed back in that form."""
        import torch

        if isinstance(out.pooler_output, torch.Tensor) and out.pooler_output.dim() == 3:
            return regroup_views(out.pooler_output, batch, self.model_type)
        return super().split_features(out, batch)

    def layouts(self, vlm, images, inputs):
        """One slot per image token, numbered in sequence order; no pixels. Several images
        of one sample are told apart by their runs of consecutive image tokens."""
        ids = inputs["input_ids"].numpy()
        out = []
        for row, ims in zip(ids, images, strict=True):
            cols = np.flatnonzero(row == vlm.image_token_id)
            runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1) if len(cols) else []
            if len(ims) == 1:
                per = [len(cols)]
            elif len(runs) == len(ims):
                per = [len(r) for r in runs]
            else:
                raise VislensError(f"cannot tell the {len(ims)} images of a prompt apart in a "
                                   f"{self.model_type} sequence without a family module")
            lays = []
            for im, count in zip(ims, per, strict=True):
                lay = Layout(im.size, geometric=False)
                for c in range(count):
                    lay._slot(0, 0, c, np.full(4, np.nan), 0, False)
                lay.grids[0] = (1, count)
                lays.append(lay)
            out.append(lays)
        return out

    def native_image_size(self, vlm) -> str:
        vision = getattr(vlm.config, "vision_config", None)
        side = getattr(vision, "image_size", None)
        return f"{side}x{side} (generic family: no token layout)" if side else "unknown"


def refuse_cross_attention(model_type: str) -> None:
    if model_type in CROSS_ATTENTION:
        raise ValueError(f"{CROSS_ATTENTION[model_type]} ({model_type}) reads the image "
                           "through cross-attention layers: its image features never enter the "
                           "language model's token sequence, so token-level interventions "
                           "have nothing to act on; vislens does not support it")
