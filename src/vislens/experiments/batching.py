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
    return Batch(inputs=inputs, token_map=batch.token_map, texts=batch.texts * n,
                 family=batch.family)


def extend_batch(batch: Batch, tokens: torch.Tensor) -> Batch:
    """Append known tokens (e.g. a clean generation, for teacher forcing) to every row."""
    tokens = tokens.to(batch.input_ids.device)
    if tokens.dim() == 1:
        tokens = tokens[None].expand(batch.size, -1)
    inputs = dict(batch.inputs)
    fill = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    family_fill = batch.family.text_fill if batch.family is not None else {}
    for key, value in batch.inputs.items():
        # every per-token tensor grows: ids, mask, and e.g. Qwen's mm_token_type_ids (0 = text)
        # or PaliGemma's token_type_ids (1 = the causal suffix, as generate continues them)
        if value.dim() == 2 and value.shape == batch.input_ids.shape:
            extra = fill.get(key, torch.full_like(tokens, family_fill.get(key, 0)))
            inputs[key] = torch.cat([value, extra.to(value.dtype)], dim=1)
    return Batch(inputs=inputs, token_map=batch.token_map, texts=batch.texts,
                 family=batch.family)


def cut_batch(batch: Batch, length: int) -> Batch:
    """`batch` cut to its first `length` positions: every per-token input (ids, mask, and
    e.g. Qwen's mm_token_type_ids) is sliced, per-image inputs (pixels, grids) are kept, so
    a cut that keeps every image token sees the same image. The token map is the batch's
    own: it only describes columns, and those before the cut keep their meaning."""
    if not 0 < length <= batch.seq_len:
        raise ValueError(f"cannot cut a batch of {batch.seq_len} positions to {length}")
    inputs = {k: (v[:, :length] if v.dim() == 2 and v.shape == batch.input_ids.shape else v)
              for k, v in batch.inputs.items()}
    return Batch(inputs=inputs, token_map=batch.token_map, texts=batch.texts,
                 features=batch.features, family=batch.family)


GROUP_COST = 16  # row-positions a separate LM call is worth (its fixed cost), for grouping


def start_groups(starts: list[int], end: int, cost: int = GROUP_COST,
                 max_rows: int | None = None) -> list[list[int]]:
    """Rows (indices into `starts`) grouped to run from their group's first start to `end`:
    the partition of the rows sorted by start that costs least, a group costing its rows x
    its positions plus `cost` (a row that starts later than its group recomputes positions
    the intervention leaves alone, which is exact), each group of at most `max_rows` rows
    (memory)."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows) if max_rows else 0, j):
            c = best[i] + (j - i) * (end - starts[order[i]]) + cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
