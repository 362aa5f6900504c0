"""Embedding ablation: replace the LM's input embeddings at chosen positions.

A forward pre-hook on the language model swaps the merged (text + image)
input embeddings; input_ids, pixel_values and grid tensors are untouched, so
rotary / mRoPE positions are those of the clean run. It acts on the prompt
pass only (under generate: the prefill), never on generated tokens.

Where the LM also reads the image after its input (Qwen3-VL's DeepStack adds
per-layer visual features to the image positions of its first decoder layers),
replacing the input embeddings alone would leave the image in the model: the
same hook replaces those injected features at the ablated positions as well
(`injected`), so ablating every image token removes the image.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from vislens.interventions.attention_function import attach


def past_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else int(cache.get_seq_length())


def _per_position(vector, positions, hidden: int, what: str) -> list[torch.Tensor]:
    """One [n_positions, hidden] tensor per sample from a [hidden] vector or per-sample values."""
    if isinstance(vector, torch.Tensor):
        if vector.shape[-1] != hidden or vector.dim() != 1:
            raise ValueError(f"{what} must have shape [{hidden}], got {tuple(vector.shape)}")
        return [vector[None].expand(len(p), hidden) for p in positions]
    values = [torch.as_tensor(v) for v in vector]
    if len(values) != len(positions):
        raise ValueError(f"give one {what} tensor per sample")
    for p, v in zip(positions, values, strict=True):
        if tuple(v.shape) != (len(p), hidden):
            raise ValueError(f"per-sample {what} must be [n_positions, {hidden}], got "
                             f"{tuple(v.shape)} for {len(p)} positions")
    return values


class Ablation:
    def __init__(self, positions, vector, hidden: int, injected=None) -> None:
        self.positions = [torch.as_tensor(np.asarray(p, dtype=np.int64).ravel())
                          for p in positions]
        if isinstance(vector, str):
            if vector != "zeros":
                raise ValueError(f"vector must be a tensor, a per-sample list or 'zeros' (for the "
                                 f"mean embedding use mean_image_embedding), got {vector!r}")
            vector = torch.zeros(hidden)
        self.values = _per_position(vector, self.positions, hidden, "ablation vector")
        self.hidden = hidden
        self.injected = self._injected(injected)

    def _injected(self, injected):
        """None (leave injected features), "zeros", or per layer: per sample [n, hidden]."""
        if injected is None or (isinstance(injected, str) and injected == "keep"):
            return None
        if isinstance(injected, str):
            if injected != "zeros":
                raise ValueError(f"injected must be 'zeros', 'keep', one [hidden] tensor per "
                                 f"injection layer or per-sample lists of them, got {injected!r}")
            return "zeros"
        injected = list(injected)
        if injected and isinstance(injected[0], torch.Tensor) and injected[0].dim() == 1:
            return [_per_position(v, self.positions, self.hidden, "injected vector")
                    for v in injected]
        # per sample: one list over layers of [n_positions, hidden]
        if len(injected) != len(self.positions):
            raise ValueError("give one list of injected values (one tensor per injection layer) "
                             "per sample")
        layers = {len(v) for v in injected}
        if len(layers) != 1:
            raise ValueError("every sample needs values for the same injection layers")
        return [_per_position([sample[layer] for sample in injected], self.positions,
                              self.hidden, "injected value") for layer in range(layers.pop())]

    applied = 0  # prompt passes this ablation replaced embeddings in
    injected_applied = 0  # prompt passes it replaced injected (DeepStack) features in

    def _check(self, batch: int, seq: int) -> None:
        if batch != len(self.positions):
            raise ValueError(f"ablation was given positions for {len(self.positions)} samples, "
                             f"model got {batch}")
        for pos in self.positions:
            if len(pos) and (int(pos.max()) >= seq or int(pos.min()) < 0):
                raise ValueError(f"ablation position out of range 0..{seq - 1}")

    def apply(self, embeds: torch.Tensor) -> torch.Tensor:
        self._check(embeds.shape[0], embeds.shape[1])
        out = embeds.clone()
        for b, (pos, val) in enumerate(zip(self.positions, self.values, strict=True)):
            if len(pos):
                out[b, pos.to(out.device)] = val.to(out.device, out.dtype)
        self.applied += 1
        return out

    def apply_injected(self, mask: torch.Tensor, features: list[torch.Tensor]
                       ) -> list[torch.Tensor]:
        """The injected features ([visual positions, hidden] per layer, rows in the row-major
        order of `mask` [B, S]) with the rows of ablated positions replaced. A position that
        is not a visual one receives no injection, so it has nothing to replace."""
        self._check(mask.shape[0], mask.shape[1])
        if self.injected is not None and self.injected != "zeros" and \
                len(self.injected) != len(features):
            raise ValueError(f"ablation has injected values for {len(self.injected)} layers, "
                             f"the model injects into {len(features)}")
        mask = mask.to(features[0].device) if features else mask
        rank = mask.flatten().long().cumsum(0).view(mask.shape) - 1
        out = []
        for layer, feats in enumerate(features):
            feats = feats.clone()
            for b, pos in enumerate(self.positions):
                if not len(pos):
                    continue
                pos = pos.to(mask.device)
                hit = mask[b, pos]
                if not bool(hit.any()):
                    continue
                rows = rank[b, pos[hit]]
                if self.injected == "zeros":
                    feats[rows] = 0
                else:
                    val = self.injected[layer][b].to(feats.device, feats.dtype)
                    feats[rows] = val[hit.to(val.device)]
            out.append(feats)
        self.injected_applied += 1
        return out


@contextmanager
def ablate(vlm, positions, vector="zeros", injected=None):
    """Replace input embeddings at `positions` (one sequence of columns per sample).

    vector: a [hidden] tensor (e.g. `mean_image_embedding(...)`), "zeros", or
    one [n_positions, hidden] tensor per sample (values in position order).

    injected: for a family whose LM also adds image features to the image positions of
    its first layers (Qwen3-VL's DeepStack), what those additions become at the ablated
    positions: "zeros" (the default when `vector` is "zeros"), "keep" (input embeddings
    only: the image still enters there), one [hidden] tensor per injection layer (e.g.
    `mean_injected_features(...)`), or per sample a list over injection layers of
    [n_positions, hidden] tensors. A family without injection ignores it.
    """
    attach(vlm)
    deepstack = bool(getattr(vlm.family, "deepstack", False))
    if injected is None and deepstack:
        if not (isinstance(vector, str) and vector == "zeros"):
            raise ValueError(f"{vlm.family.label} adds image features to the image positions of "
                             "its first decoder layers as well (DeepStack); say what replaces "
                             "them: injected='zeros', 'keep', or mean_injected_features(vlm, "
                             "images) for a mean ablation")
        injected = "zeros"
    ab = Ablation(positions, vector, vlm.language_model.config.hidden_size,
                  injected if deepstack else None)

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or past_length(kwargs) > 0:
            return None
        kwargs["inputs_embeds"] = ab.apply(embeds)
        extra = kwargs.get("deepstack_visual_embeds")
        if ab.injected is not None and extra is not None:
            kwargs["deepstack_visual_embeds"] = ab.apply_injected(kwargs["visual_pos_masks"],
                                                                  list(extra))
        return args, kwargs

    handle = vlm.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield ab
    finally:
        handle.remove()
