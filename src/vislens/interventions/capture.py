"""Capture residual streams, keys / values (pre- and post-RoPE) and attention rows.

Only the requested positions are kept (gathered inside the hooks), so memory
grows with what was asked, not with layers x sequence. Capture records the
prompt pass (under generate: the prefill); with generated=True it also keeps
the residual stream of every generated token ([B, steps, hidden] per layer).

With a `sink`, keys and values are handed over as each layer produces them and
not kept: what a caller stores or reduces is then its own choice, and the
capture itself never holds more than one layer (perceive spills them to disk).

Residual index l is the input of decoder layer l (0 = LM input embeddings,
after any ablation); index num_layers is the last layer's output, before the
final norm, so `vlm.unembed(residual[num_layers])` gives the model's logits.
Inputs are read where each layer receives them, not from the previous layer's
output: Qwen3-VL adds DeepStack image features between its first layers.

Pre-RoPE keys are the key as RoPE receives it: k_proj's output, through the
family's key norm where it has one (Qwen3-VL, Gemma 3).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from vislens.interventions.ablate import past_length
from vislens.interventions.attention_function import attach


def _rows(positions) -> np.ndarray:
    rows = [(b, int(p)) for b, ps in enumerate(positions)
            for p in np.asarray(ps, dtype=np.int64).ravel()]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


@dataclass
class Captured:
    """Gathered tensors; row i of each [N, ...] tensor is (sample, column) = rows[i]."""

    rows: np.ndarray
    attention_rows: np.ndarray
    residual: dict[int, torch.Tensor] = field(default_factory=dict)  # [N, hidden]
    keys_pre: dict[int, torch.Tensor] = field(default_factory=dict)  # [N, kv_heads, head_dim]
    keys_post: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # [Nq, heads, keys]
    generated: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, steps, hidden]

    def of(self, kind: str, layer: int, sample: int) -> torch.Tensor:
        """The rows of one sample (in the order its positions were given)."""
        table = getattr(self, kind)[layer]
        rows = self.attention_rows if kind == "attention" else self.rows
        return table[torch.as_tensor(np.flatnonzero(rows[:, 0] == sample), device=table.device)]


class _Sink(dict):
    """A layer -> tensor table that passes every tensor on instead of keeping it."""

    def __init__(self, kind: str, sink):
        super().__init__()
        self.kind, self.sink = kind, sink

    def __setitem__(self, layer: int, value: torch.Tensor) -> None:
        self.sink(self.kind, layer, value)


class Capture:
    def __init__(self, vlm, positions, layers, residual, keys, values, attention_queries,
                 sink=None):
        self.num_layers = vlm.num_layers
        self.layers = set(range(self.num_layers)) if layers is None else {int(x) for x in layers}
        self.out = Captured(rows=_rows(positions),
                            attention_rows=_rows(attention_queries or []))
        if sink is not None:
            for kind in ("keys_pre", "keys_post", "values"):
                setattr(self.out, kind, _Sink(kind, sink))
        if keys not in (False, True, "pre", "post"):
            raise ValueError(f"capture keys={keys!r}: pass True (pre- and post-RoPE), 'pre', "
                             "'post' or False")
        self.want_keys_pre, self.want_keys_post = keys in (True, "pre"), keys in (True, "post")
        self.recording = False
        self.steps: dict[int, list[torch.Tensor]] = {}
        self.heads = vlm.language_model.config.num_attention_heads
        b, p = self.out.rows[:, 0], self.out.rows[:, 1]
        self._b, self._p = torch.as_tensor(b), torch.as_tensor(p)
        self._flat: dict[tuple, torch.Tensor] = {}
        self._qb = torch.as_tensor(self.out.attention_rows[:, 0])
        self._qp = torch.as_tensor(self.out.attention_rows[:, 1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [N, ...] at the requested (sample, column) rows: one index_select
        of the flattened rows (its index made once per sequence length and device; this
        runs in every hook of every layer)."""
        if not x.is_contiguous():  # flattening would copy all of it: index in place
            return x[self._b.to(x.device), self._p.to(x.device)].detach()
        key = (x.shape[1], x.device)
        flat = self._flat.get(key)
        if flat is None:
            flat = self._flat[key] = (self._b * x.shape[1] + self._p).to(x.device)
        return x.reshape(-1, *x.shape[2:]).index_select(0, flat).detach()

    def wants_attention(self, layer: int, q_len: int) -> bool:
        return self.recording and len(self._qb) > 0 and layer in self.layers

    def on_attention(self, module, layer, query, key, mask, scaling, softcap=None) -> None:
        if not self.recording or layer not in self.layers:
            return
        if self.want_keys_post:
            self.out.keys_post[layer] = self.gather(key.transpose(1, 2))
        if len(self._qb) == 0:
            return
        n_rep = query.shape[1] // key.shape[1]
        keys = key.repeat_interleave(n_rep, dim=1)  # [B, H, K, d]
        qb, qp = self._qb.to(query.device), self._qp.to(query.device)
        q = query[qb, :, qp]  # [Nq, H, d]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        rows = []
        for b in torch.unique(qb).tolist():
            sel = (qb == b).nonzero().flatten()
            scores = torch.einsum("nhd,hkd->nhk", q[sel].float(), keys[b].float()) * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            if mask is not None:
                m = mask[b if mask.shape[0] > 1 else 0, 0][qp[sel]]  # [n, K]
                scores = scores + m[:, None, :].float()
            rows.append((sel, torch.softmax(scores, dim=-1)))
        att = torch.empty(len(qb), query.shape[1], key.shape[2], device=query.device)
        for sel, probs in rows:
            att[sel] = probs
        self.out.attention[layer] = att.detach()


@contextmanager
def capture(vlm, positions, layers: Iterable[int] | None = None, residual: bool = True,
            keys: bool | str = False, values: bool = False, attention_queries=None,
            generated: bool = False, sink=None):
    """Record what the LM computes at chosen positions while the context is open.

    positions: one sequence of prompt columns per sample (residual, keys, values).
    layers: which layers (None = all); residual[l] is recorded for l in layers
    and residual[num_layers] when the last layer is included.
    keys: True for keys before and after RoPE (`keys_pre`, `keys_post`), "pre" or "post"
    for one of them (the other is then not gathered at all).
    attention_queries: one sequence of query columns per sample; their
    attention rows over all keys ([Nq, heads, keys], post-softmax, including
    any active knockout) are recorded per layer.
    generated: also keep the residual of each token generate produces
    (`generated[l]` is [B, steps, hidden]; its logits are vlm.unembed of the last).
    sink: a callable (kind, layer, rows) given each layer's keys_pre / keys_post /
    values rows ([N, kv_heads, head_dim], rows as in `Captured.rows`) as soon as they
    exist; those tables then stay empty.
    """
    state = attach(vlm)
    cap = Capture(vlm, positions, layers, residual, keys, values, attention_queries, sink)
    handles = []

    def keep_step(idx, hidden):
        cap.steps.setdefault(idx, []).append(hidden[:, -1].detach())

    def start(module, args, kwargs):
        cap.recording = past_length(kwargs) == 0
        read(0, args, kwargs)

    def read(idx, args, kwargs):
        """The input of decoder layer idx: residual[idx]."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if cap.recording and residual and idx in wanted:
            cap.out.residual[idx] = cap.gather(hidden)
        if generated and residual and idx in wanted:
            keep_step(idx, hidden)

    wanted = set(cap.layers) | ({cap.num_layers} if cap.num_layers - 1 in cap.layers else set())
    handles.append(vlm.layers[0].register_forward_pre_hook(start, with_kwargs=True))
    for idx, layer in enumerate(vlm.layers):
        if residual and idx > 0 and idx in wanted:
            handles.append(layer.register_forward_pre_hook(
                lambda module, args, kwargs, idx=idx: read(idx, args, kwargs), with_kwargs=True))
        if residual and idx == cap.num_layers - 1 and cap.num_layers in wanted:
            def last(module, args, output, idx=idx):
                hidden = output[0] if isinstance(output, tuple) else output
                if cap.recording:
                    cap.out.residual[idx + 1] = cap.gather(hidden)
                if generated:
                    keep_step(idx + 1, hidden)
            handles.append(layer.register_forward_hook(last))
        if idx not in cap.layers:
            continue
        attn = layer.self_attn
        head_dim = getattr(attn, "head_dim", None)
        for want, proj, table, norm in ((cap.want_keys_pre, attn.k_proj, cap.out.keys_pre,
                                         getattr(attn, "k_norm", None)),
                                        (values, attn.v_proj, cap.out.values, None)):
            if want:
                def hook(module, args, output, idx=idx, table=table, head_dim=head_dim,
                         norm=norm):
                    if cap.recording:
                        got = cap.gather(output)
                        got = got.view(got.shape[0], got.shape[-1] // head_dim, head_dim)
                        table[idx] = got if norm is None else norm(got).detach()
                handles.append(proj.register_forward_hook(hook))
    state.captures.append(cap)
    try:
        yield cap.out
    finally:
        state.captures.remove(cap)
        for h in handles:
            h.remove()
        if generated:
            # step 0 is the prefill's last position: it produced the first new token
            cap.out.generated = {k: torch.stack(v, 1) for k, v in cap.steps.items()}
