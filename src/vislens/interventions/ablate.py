"""Embedding ablation: replace the LM's input embeddings at chosen positions.

A forward pre-hook on the language model swaps the merged (text + image)
input embeddings; input_ids, pixel_values and grid tensors are untouched, so
rotary / mRoPE positions are those of the clean run. It acts on the prompt
pass only (under generate: the prefill), never on generated tokens.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from vislens.interventions.hub import attach


def _past_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else int(cache.get_seq_length())


class Ablation:
    def __init__(self, positions, vector, hidden: int) -> None:
        self.positions = [torch.as_tensor(np.asarray(p, dtype=np.int64).ravel())
                          for p in positions]
        if isinstance(vector, str):
            if vector != "zeros":
                raise ValueError(f"vector must be a tensor, a per-sample list or 'zeros' (for the "
                                 f"mean embedding use mean_image_embedding), got {vector!r}")
            vector = torch.zeros(hidden)
        if isinstance(vector, torch.Tensor):
            if vector.shape[-1] != hidden or vector.dim() != 1:
                raise ValueError(f"ablation vector must have shape [{hidden}], got "
                                 f"{tuple(vector.shape)}")
            self.values = [vector[None].expand(len(p), hidden) for p in self.positions]
        else:
            self.values = [torch.as_tensor(v) for v in vector]
            for p, v in zip(self.positions, self.values, strict=False):
                if tuple(v.shape) != (len(p), hidden):
                    raise ValueError(f"per-sample values must be [n_positions, {hidden}], got "
                                     f"{tuple(v.shape)} for {len(p)} positions")
            if len(self.values) != len(self.positions):
                raise ValueError("give one value tensor per sample")

    applied = 0  # prompt passes this ablation replaced embeddings in

    def apply(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.shape[0] != len(self.positions):
            raise ValueError(f"ablation was given positions for {len(self.positions)} samples, "
                             f"model got {embeds.shape[0]}")
        out = embeds.clone()
        for b, (pos, val) in enumerate(zip(self.positions, self.values, strict=True)):
            if len(pos):
                if int(pos.max()) >= embeds.shape[1] or int(pos.min()) < 0:
                    raise ValueError(f"ablation position out of range 0..{embeds.shape[1] - 1}")
                out[b, pos.to(out.device)] = val.to(out.device, out.dtype)
        self.applied += 1
        return out


@contextmanager
def ablate(vlm, positions, vector="zeros"):
    """Replace input embeddings at `positions` (one sequence of columns per sample).

    vector: a [hidden] tensor (e.g. `mean_image_embedding(...)`), "zeros", or
    one [n_positions, hidden] tensor per sample (values in position order).
    """
    attach(vlm)
    ab = Ablation(positions, vector, vlm.language_model.config.hidden_size)

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or _past_length(kwargs) > 0:
            return None
        kwargs["inputs_embeds"] = ab.apply(embeds)
        return args, kwargs

    handle = vlm.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield ab
    finally:
        handle.remove()
