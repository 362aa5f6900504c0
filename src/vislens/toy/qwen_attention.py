"""Batched window attention for training the toy-qwen vision tower on a CPU.

Qwen2.5-VL's vision attention runs one SDPA call per window unless a
flash-attention implementation is selected, in which case it makes one call
with `cu_seq_lens`. On CPU the per-window backward is ~20x slower than one
batched call, so training registers this function (the name contains "flash"
so the model takes the one-call path) and splits windows itself: equal windows
are stacked into a batch, anything else falls back to a loop. The result is
the same block-diagonal attention; only the speed differs. Shipped weights and
every experiment use plain "sdpa".
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "vislens_packed_flash"


def packed_window_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            cu_seq_lens_q: torch.Tensor | None = None, **kwargs
                            ) -> tuple[torch.Tensor, None]:
    """[1, H, S, D] packed windows -> [1, S, H, D], attention only inside each window."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("packed window attention needs one packed sequence with cu_seq_lens_q")
    _, heads, total, dim = query.shape
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    if len(set(lengths)) == 1:
        n, length = len(lengths), lengths[0]

        def windows(x: torch.Tensor) -> torch.Tensor:
            return x[0].view(heads, n, length, dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(windows(query), windows(key), windows(value),
                                             scale=scaling)  # [n, H, L, D]
        return out.permute(0, 2, 1, 3).reshape(1, total, heads, dim), None
    outs = [F.scaled_dot_product_attention(q, k, v, scale=scaling) for q, k, v in zip(
        *(torch.split(x, lengths, dim=2) for x in (query, key, value)), strict=True)]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_window_attention)


@contextmanager
def packed_vision_attention(model):
    """Use the batched window attention in `model`'s vision tower inside the block."""
    config = model.model.visual.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield model
    finally:
        config._attn_implementation = before
