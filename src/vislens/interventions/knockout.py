"""Attention knockout: block chosen (query -> key) edges in chosen layers.

Blocking is an additive -inf on exactly those pairs, applied inside the
registered attention function on top of whatever mask transformers built
(None/bool for sdpa, float for eager), so both implementations give the same
numbers; a layer with nothing blocked calls the original function untouched.

Edges are given per sample as (queries, keys) pairs of prompt COLUMNS
(ImageTokenMap positions). Under generate, queries="last" means the last
prompt position AND every generated position; explicit query columns only
ever refer to prompt positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import torch

from vislens.interventions.attention_function import attach

LAST = "last"


class Knockout:
    """Blocked pairs of one batch, materialised once as boolean matrices."""

    def __init__(self, edges, layers: Iterable[int] | None, num_layers: int,
                 seq_len: int | None = None) -> None:
        self.layers = set(range(num_layers)) if layers is None else {int(x) for x in layers}
        bad = [x for x in self.layers if not 0 <= x < num_layers]
        if bad:
            raise ValueError(f"knockout layers {sorted(bad)} out of range 0..{num_layers - 1}")
        self.edges = [_groups(g) for g in edges]
        self.batch = len(self.edges)
        self.empty = all(len(_columns(k, None, "key")) == 0 for g in self.edges for _, k in g)
        self.seq_len = None
        self._device = None
        self.applied = 0  # attention calls that really blocked something (a silent no-op shows)
        if seq_len is not None:
            self._build(seq_len, torch.device("cpu"))

    def _build(self, seq_len: int, device) -> None:
        """Materialise [B, S, S] prompt pairs and [B, S] keys blocked for generated queries."""
        prompt = torch.zeros(self.batch, seq_len, seq_len, dtype=torch.bool)
        generated = torch.zeros(self.batch, seq_len, dtype=torch.bool)
        for b, groups in enumerate(self.edges):
            for queries, keys in groups:
                k = _columns(keys, seq_len, "key")
                if isinstance(queries, str):
                    prompt[b, seq_len - 1, k] = True
                    generated[b, k] = True
                else:
                    q = _columns(queries, seq_len, "query")
                    prompt[b, q[:, None], k[None, :]] = True
        self.seq_len = seq_len
        self.prompt = prompt.to(device)
        self.generated = generated.to(device)
        self._device = device

    def blocked(self, layer: int, q_len: int, k_len: int, batch: int, device,
                key_end: int | None = None) -> torch.Tensor | None:
        """[B, 1, q_len, k_len] pairs to block in this call, or None when nothing is.

        key_end: the absolute column one past this call's last key (tokens seen so far,
        the current ones included; default k_len). Queries are the last q_len columns
        before it and keys the last k_len: a sliding-window layer's cache (Gemma 3)
        hands attention only the keys of its window once the sequence outgrows it.
        """
        if self.empty or layer not in self.layers:
            return None
        if batch != self.batch:
            raise ValueError(f"knockout was built for {self.batch} samples, model got {batch}")
        end = k_len if key_end is None else int(key_end)
        if end == q_len:  # a pass without cache (a prefill): positions are its columns
            if self.seq_len != q_len:
                self._build(q_len, device)
        elif self.seq_len is None:
            raise ValueError("knockout saw no prompt pass; run a forward or generate from scratch")
        if self._device != device:
            self.prompt, self.generated = self.prompt.to(device), self.generated.to(device)
            self._device = device
        # a static cache hands every slot, filled or not: its keys are columns from 0
        q0, k0, prompt_len = end - q_len, max(end - k_len, 0), self.seq_len
        out = torch.zeros(batch, q_len, k_len, dtype=torch.bool, device=device)
        k1 = min(end, prompt_len)  # keys [k0, k1) are prompt columns
        if k1 > k0:
            q1 = min(end, prompt_len)
            if q1 > q0:  # prompt queries [q0, q1)
                out[:, :q1 - q0, :k1 - k0] = self.prompt[:, q0:q1, k0:k1]
            g0 = max(q0, prompt_len)
            if end > g0:  # generated queries [g0, end)
                out[:, g0 - q0:, :k1 - k0] = self.generated[:, None, k0:k1]
        if not bool(out.any()):
            return None
        self.applied += 1
        return out[:, None]


def _groups(groups) -> list:
    """A sample's edges as a list of (queries, keys) pairs."""
    if isinstance(groups, tuple) and len(groups) == 2 and (
            isinstance(groups[0], str) or not isinstance(groups[0], tuple)):
        groups = [groups]
    out = []
    for queries, keys in groups:
        if isinstance(queries, str) and queries != LAST:
            raise ValueError(f"queries must be prompt columns or 'last', got {queries!r}")
        out.append((queries, keys))
    return out


def _columns(values, seq_len: int | None, what: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    idx = torch.as_tensor(np.asarray(values, dtype=np.int64).ravel())
    if seq_len is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= seq_len):
        raise ValueError(f"{what} column out of range 0..{seq_len - 1}")
    return idx


@contextmanager
def knockout(vlm, edges, layers: Iterable[int] | None = None, seq_len: int | None = None):
    """Block attention edges while the context is open (forward and generate).

    edges: one entry per sample of the batch that will run; each a
    (queries, keys) pair or a list of them. queries: prompt columns or "last";
    keys: prompt columns. layers: None = every layer. An empty edge set is
    exactly the clean run. seq_len: the prompt's length, needed only when the first
    pass continues from a cache (interventions.continuation) instead of running the
    prompt from scratch.
    """
    state = attach(vlm)
    ko = Knockout(edges, layers, vlm.num_layers, seq_len)
    state.knockouts.append(ko)
    try:
        yield ko
    finally:
        state.knockouts.remove(ko)
