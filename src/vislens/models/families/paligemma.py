"""PaliGemma (`paligemma`, e.g. paligemma2-3b-mix-224): SigLIP at 224 px, a fixed 16x16 grid
of the image squashed to a square; a prefix LM.

Image tokens, BOS, the question and its newline form the prefix, which attends to
itself in both directions; the answer (the suffix) is causal. transformers builds that
mask from `token_type_ids` (0 = prefix), and vislens' knockout adds its blocked pairs
on top of it, so it composes with the bidirectional prefix as with a causal mask.
Positions count from 1. PaliGemma 2's Gemma 2 decoder soft-caps its attention scores,
which sdpa cannot do: it runs (and vislens wraps) eager attention, and its final
logits are soft-capped too.
"""

from __future__ import annotations

from vislens.models.families.base import regroup_views
from vislens.models.families.llava import Llava
from vislens.models.families.registry import register


@register
class PaliGemma(Llava):
    """LLaVA-1.5's layout (one raster grid of the processed square) with its own model."""

    model_type = "paligemma"
    label = "PaliGemma"
    model_class = "PaliGemmaForConditionalGeneration"
    processor_class = "PaliGemmaProcessor"
    position_offset = 1
    text_fill = {"token_type_ids": 1}  # appended answer tokens are the causal suffix

    def attn_implementation(self, config: dict) -> str:
        text = (config.get("text_config") or {}).get("model_type", "gemma")
        return "eager" if text == "gemma2" else "sdpa"

    def logit_softcap(self, config) -> float | None:
        return getattr(config.get_text_config(), "final_logit_softcapping", None)

    def split_features(self, out, batch):
        """Its vision pass gives one [views, tokens, hidden] tensor (tiles and thumbnail, or
        one view per image): regrouped per image, handed back in that form."""
        return regroup_views(out.pooler_output, batch, "PaliGemma")
