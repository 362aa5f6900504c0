"""Run many conditions of one prompt as one batch, with one vision pass.

A condition only changes LM inputs or LM attention, so the prepared prompt
is repeated along the batch and the image features are computed once and
handed back to the model for every row.
"""

from __future__ import annotations

import torch

from vislens.models.vlm import Batch

PER_IMAGE_KEYS = ("pixel_values",)


def repeat_batch(batch: Batch, n: int) -> Batch:
    """The one-sample batch `batch` as n identical rows (pixel tensors left as they are)."""
    if batch.size != 1:
        raise ValueError("repeat_batch takes a batch of one sample")
    inputs = {k: (v if k in PER_IMAGE_KEYS else v.repeat(n, *([1] * (v.dim() - 1))))
              for k, v in batch.inputs.items()}
    return Batch(inputs=inputs, token_map=batch.token_map, texts=batch.texts * n)


def extend_batch(batch: Batch, tokens: torch.Tensor) -> Batch:
    """Append known tokens (e.g. a clean generation, for teacher forcing) to every row."""
    tokens = tokens.to(batch.input_ids.device)
    if tokens.dim() == 1:
        tokens = tokens[None].expand(batch.size, -1)
    inputs = dict(batch.inputs)
    inputs["input_ids"] = torch.cat([batch.input_ids, tokens], dim=1)
    inputs["attention_mask"] = torch.cat(
        [batch.attention_mask, torch.ones_like(tokens, dtype=batch.attention_mask.dtype)], dim=1)
    return Batch(inputs=inputs, token_map=batch.token_map, texts=batch.texts)
