"""Continue the language model from the clean run's keys and values.

An intervention that first changes the LM at layer a and position p (a knockout whose
first blocked query is p, from its window's first layer a; an ablation whose first
replaced embedding is p) leaves every earlier position, in every layer, and every layer
below a, exactly as in the clean run, provided no position attends to a later one. So
the clean pass keeps its keys and values (`record`), and a condition runs only
positions p.. of layers a..L (`Rows.advance`), attending to the clean keys and values of
positions before p. Many conditions share that prefix without copying it: the cache
layers below hold it once and hand attention a batch-wide view per call.

Where the family's mask lets earlier positions see later ones (Gemma 3's bidirectional
image block, PaliGemma's prefix-LM), or the LM reads more than its input embeddings
(Qwen3-VL's DeepStack), or a layer keeps only a sliding window of keys, the recorded pass
is marked not `reusable` (with the reason) and callers fall back to recomputing every
position, which is always exact.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from vislens.interventions.capture import capture

# what a causal decoder's forward takes besides positions, mask and cache; anything else
# (DeepStack features, mask mappings) means the LM reads more than its input embeddings
_PLAIN_KWARGS = {"inputs_embeds", "attention_mask", "position_ids", "cache",
                 "past_key_values", "use_cache", "return_dict", "output_attentions",
                 "output_hidden_states", "cache_position", "logits_to_keep"}


class SharedPrefixLayer(DynamicLayer):
    """One layer's keys and values as frozen segments (batch 1 = shared by every row, or
    batch n) plus a growing tail: no row copies the shared prefix until attention asks,
    and then only for the one layer it runs."""

    def __init__(self, segments: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> None:
        super().__init__()
        self.segments = segments
        self.rows = rows
        self.tail: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True
        self.keys = self.values = None

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != self.rows:
            raise ValueError(f"cache holds {self.rows} rows, the pass has {key_states.shape[0]}")
        if self.tail is None:
            self.tail = (key_states, value_states)
        else:
            self.tail = (torch.cat([self.tail[0], key_states], -2),
                         torch.cat([self.tail[1], value_states], -2))
        parts = self.frozen()
        keys = torch.cat([k.expand(self.rows, -1, -1, -1) for k, _ in parts], -2)
        values = torch.cat([v.expand(self.rows, -1, -1, -1) for _, v in parts], -2)
        return keys, values

    def frozen(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every segment so far, the tail included (what a fork starts from)."""
        return [*self.segments, *([self.tail] if self.tail is not None else [])]

    def get_seq_length(self) -> int:
        return sum(int(k.shape[-2]) for k, _ in self.frozen())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        def pick(t: torch.Tensor) -> torch.Tensor:  # a shared (batch-1) segment stays shared
            return t if t.shape[0] == 1 else t.index_select(0, indices.to(t.device))

        self.segments = [(pick(k), pick(v)) for k, v in self.segments]
        if self.tail is not None:
            self.tail = (pick(self.tail[0]), pick(self.tail[1]))
        self.rows = int(len(indices))


@dataclass
class Rows:
    """Rows that continue one recorded pass: their keys and values so far (every layer),
    attention mask [n, T] and positions (as the LM takes them, last dim T)."""

    layers: list[SharedPrefixLayer]
    mask: torch.Tensor
    positions: torch.Tensor
    first_layer: int = 0  # layers below it were skipped by some advance: nothing below runs
    logits: torch.Tensor | None = None  # the last advance's kept logits [n, keep, vocab]

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def fork(self) -> Rows:
        """The same rows, continuing separately (each fork appends its own tokens)."""
        layers = [SharedPrefixLayer(layer.frozen(), layer.rows) for layer in self.layers]
        return Rows(layers, self.mask, self.positions, self.first_layer, self.logits)

    def select(self, keep: torch.Tensor | list[int]) -> Rows:
        """Only the rows `keep` (e.g. those still generating)."""
        idx = torch.as_tensor(keep, dtype=torch.long)
        out = self.fork()
        for layer in out.layers:
            layer.batch_select_indices(idx)
        dim = self.positions.dim() - 2  # the rows' dim: [n, T] or [3, n, T]
        out.mask = self.mask.index_select(0, idx.to(self.mask.device))
        out.positions = self.positions.index_select(dim, idx.to(self.positions.device))
        out.logits = None if self.logits is None else \
            self.logits.index_select(0, idx.to(self.logits.device))
        return out

    def next_positions(self, n: int) -> torch.Tensor:
        """Positions of n text tokens appended to every row: one past the largest position so
        far, in every rotary dimension (how generate continues mRoPE; plain RoPE counts on)."""
        rows_dim = self.positions.dim() - 2
        flat = self.positions.movedim(rows_dim, 0).reshape(self.size, -1)
        start = flat.max(-1).values + 1
        steps = start[:, None] + torch.arange(n, device=start.device)[None]
        if self.positions.dim() == 3:
            return steps[None].expand(self.positions.shape[0], -1, -1)
        return steps


@dataclass
class Recorded:
    """A clean LM pass kept for reuse (see the module docstring)."""

    embeds: torch.Tensor  # [B, S, hidden] the LM's input embeddings
    mask: torch.Tensor  # [B, S]
    positions: torch.Tensor  # as the LM took them
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [B, kv, S, d]
    residual: dict[int, torch.Tensor] = field(default_factory=dict)  # entering layer l
    logits: torch.Tensor | None = None  # [B, keep, vocab]
    why_not: str = ""  # why it cannot be continued ("" = it can)

    @property
    def reusable(self) -> bool:
        return not self.why_not

    @property
    def seq_len(self) -> int:
        return int(self.mask.shape[1])

    def after(self, position: int) -> dict:
        """The recorded positions and mask of positions position.. (for `advance`)."""
        return {"positions": self.positions[..., position:], "mask": self.mask[:, position:]}

    def rows(self, n: int, position: int) -> Rows:
        """n rows holding the clean keys and values of positions [0, position)."""
        if not self.reusable:
            raise ValueError(f"this pass cannot be continued: {self.why_not}")
        if not 0 <= position <= self.seq_len:
            raise ValueError(f"position {position} outside the recorded 0..{self.seq_len}")
        b = int(self.mask.shape[0])
        if b not in (1, n):
            raise ValueError(f"a pass of {b} rows continues as {b} rows (or 1 as many)")
        layers = [SharedPrefixLayer([(k[..., :position, :], v[..., :position, :])], n)
                  for k, v in self.layers]
        rows_dim = self.positions.dim() - 2
        positions = self.positions.narrow(-1, 0, position)
        if b != n:
            positions = positions.expand(*positions.shape[:rows_dim], n, position)
        return Rows(layers, self.mask[:, :position].expand(n, -1), positions)


def _why_not(vlm, kwargs: dict, cache) -> str:
    extra = sorted(k for k, v in kwargs.items() if k not in _PLAIN_KWARGS and v is not None)
    if extra:
        return f"the language model also reads {', '.join(extra)}"
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return "the language model gets a mask of its own (not causal)"
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return "a layer keeps only a sliding window of keys"
    return ""


def refused(vlm) -> str:
    """Why an earlier `record` on this model could not be continued ("" = none refused)."""
    return getattr(vlm, "continuation_refused", "")


@torch.no_grad()
def record(vlm, batch, image_features=None, residual_layers=(), keep: int = 1) -> Recorded:
    """One clean forward that keeps what later passes reuse: the LM's input embeddings,
    mask and positions, every layer's keys and values, the residual entering each layer in
    `residual_layers`, and the logits of the last `keep` positions."""
    from transformers import DynamicCache

    seen: dict = {}
    config = vlm.language_model.config
    cache = DynamicCache(config=config)

    def hook(module, args, kwargs):
        if kwargs.get("inputs_embeds") is None:
            raise ValueError("the language model was called without input embeddings")
        seen.update(kwargs)
        kwargs["cache"], kwargs["use_cache"] = cache, True
        kwargs.pop("past_key_values", None)
        return args, kwargs

    handle = vlm.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    layers = sorted({int(x) for x in residual_layers if 0 < int(x) < vlm.num_layers})
    cols = [np.arange(batch.seq_len)] * batch.size
    try:
        with capture(vlm, cols, layers=layers) if layers else nullcontext() as cap:
            logits = vlm.forward(batch, image_features=image_features, logits_to_keep=keep).logits
    finally:
        handle.remove()
    embeds = seen["inputs_embeds"]
    mask = seen.get("attention_mask")
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        mask2d = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    else:
        mask2d = mask
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None].expand(
            embeds.shape[0], -1)
    shape = (batch.size, batch.seq_len, -1)
    why_not = _why_not(vlm, seen, cache)
    if why_not:
        vlm.continuation_refused = why_not  # the next caller can skip the recording
    return Recorded(
        embeds=embeds, mask=mask2d, positions=positions,
        layers=[(layer.keys, layer.values) for layer in cache.layers],
        residual={x: cap.residual[x].view(shape) for x in layers} if layers else {}, logits=logits,
        why_not=why_not)


@torch.no_grad()
def extend(vlm, recorded: Recorded, ids: torch.Tensor, residual_layers=(), keep: int = 1
           ) -> Recorded:
    """`recorded` with text tokens `ids` [k] appended to every row, as if it had been
    recorded with them (e.g. a clean answer, for teacher forcing): its keys and values, the
    residual entering each layer in `residual_layers`, and the logits of the last `keep`
    positions (those before the new tokens come from `recorded.logits`)."""
    b, s, k = int(recorded.mask.shape[0]), recorded.seq_len, int(len(ids))
    if keep > k + int(recorded.logits.shape[1]):
        raise ValueError(f"keep={keep} reaches before the {recorded.logits.shape[1]} recorded "
                         "logits; record with a larger keep")
    layers = sorted({int(x) for x in residual_layers if 0 < int(x) < vlm.num_layers})
    if k == 0:
        return replace(recorded, residual={x: recorded.residual[x] for x in layers},
                       logits=recorded.logits[:, recorded.logits.shape[1] - keep:])
    rows = recorded.rows(b, s)
    hidden = embed(vlm, ids.reshape(1, -1).expand(b, -1))
    seen: dict[int, torch.Tensor] = {}
    handles = [vlm.layers[x].register_forward_pre_hook(
        lambda module, args, kwargs, x=x: seen.__setitem__(
            x, (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
        for x in layers]
    try:
        logits = advance(vlm, rows, hidden, keep=max(1, min(keep, k)))
    finally:
        for h in handles:
            h.remove()
    if keep > k:
        logits = torch.cat([recorded.logits[:, recorded.logits.shape[1] - (keep - k):], logits],
                           1)
    return Recorded(
        embeds=torch.cat([recorded.embeds, hidden.to(recorded.embeds.dtype)], 1),
        mask=rows.mask, positions=rows.positions,
        layers=[(torch.cat([kk for kk, _ in layer.frozen()], -2).expand(b, -1, -1, -1),
                 torch.cat([vv for _, vv in layer.frozen()], -2).expand(b, -1, -1, -1))
                for layer in rows.layers],
        residual={x: torch.cat([recorded.residual[x], seen[x]], 1) for x in layers},
        logits=logits)


def advance(vlm, rows: Rows, hidden: torch.Tensor, positions: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, layer: int = 0, keep: int = 1,
            grad: bool = False) -> torch.Tensor:
    """Run `hidden` [n, t, hidden] (input embeddings, or with layer = a the residual entering
    layer a) through layers layer..L as the next t positions of `rows`; their keys and
    values join the rows' cache, and the logits of the last `keep` are returned (also kept
    as rows.logits). positions and mask [n, t]: as the LM takes them (default: real text
    tokens appended; `Recorded.after(p)` gives the recorded ones of positions p..).
    grad: build the autograd graph back to `hidden` (integrated gradients); off, nothing is
    kept for a backward pass."""
    if layer < rows.first_layer:
        raise ValueError(f"these rows skipped layers below {rows.first_layer}; they cannot "
                         f"continue from layer {layer}")
    if not 0 <= layer < vlm.num_layers:
        raise ValueError(f"layer must be in 0..{vlm.num_layers - 1}, got {layer}")
    n, t = int(hidden.shape[0]), int(hidden.shape[1])
    if n != rows.size:
        raise ValueError(f"{n} rows of input for {rows.size} rows of cache")
    if positions is None:
        positions = rows.next_positions(t)
    rows_dim = rows.positions.dim() - 2
    positions = positions.to(rows.positions.device)
    positions = positions.expand(*positions.shape[:rows_dim], n, t)
    new = torch.ones(n, t, dtype=rows.mask.dtype) if mask is None else mask
    mask = torch.cat([rows.mask, new.to(rows.mask.device, rows.mask.dtype).expand(n, t)], 1)
    skipped = list(vlm.layers[:layer])

    def identity(hidden_states, *args, **kwargs):
        return hidden_states

    for mod in skipped:
        mod.forward = identity
    try:
        with torch.set_grad_enabled(grad):
            out = vlm.language_model(inputs_embeds=hidden.to(vlm.dtype), attention_mask=mask,
                                     position_ids=positions, cache=Cache(layers=rows.layers),
                                     use_cache=True)
            logits = vlm.lm_head(out.last_hidden_state[:, -keep:])
            cap = vlm.family.logit_softcap(vlm.config)
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
    finally:
        for mod in skipped:
            del mod.forward
    rows.mask = mask
    rows.positions = torch.cat([rows.positions, positions], -1)
    rows.first_layer = max(rows.first_layer, layer)
    rows.logits = logits
    return logits


def embed(vlm, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of text token ids [n, t] (the family's own scaling included)."""
    table = vlm.language_model.get_input_embeddings()
    return table(ids.to(table.weight.device))
