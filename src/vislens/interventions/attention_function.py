"""The one attention function vislens registers, and the per-model state it reads.

`attach(vlm)` switches the LANGUAGE MODEL (only) from "sdpa"/"eager" to
"vislens_sdpa"/"vislens_eager": the same mask builders are registered under
those names, and the attention function calls the model's own implementation
unchanged unless a knockout or capture is active in that layer. Knockout adds
-inf on exactly the chosen (query, key) pairs; capture reads the post-RoPE
keys and the attention rows of chosen queries.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "vislens_"


@dataclass
class State:
    """Interventions active on one model; each knows its own batch and positions."""

    knockouts: list = field(default_factory=list)
    captures: list = field(default_factory=list)
    key_end: int | None = None  # tokens the LM has seen, current pass included (set per pass)

    def active(self) -> bool:
        return bool(self.knockouts or self.captures)


def _inner_function(module, inner: str):
    if inner == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward to wrap")
        return fn
    return ALL_ATTENTION_FUNCTIONS[inner]


def as_additive(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
                ) -> torch.Tensor:
    """Any mask transformers passes (None = causal, bool, float) as an additive float mask."""
    q_len, k_len = query.shape[2], key.shape[2]
    minimum = torch.finfo(query.dtype).min
    if mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)
        allowed = q_pos[:, None] >= torch.arange(k_len, device=query.device)[None, :]
        mask = allowed.view(1, 1, q_len, k_len)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        return torch.where(mask, zero, minimum)
    return mask.to(query.dtype)


def vislens_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered attention: the model's own sdpa/eager, plus active knockouts / captures."""
    impl = module.config._attn_implementation
    inner = impl[len(PREFIX):] if impl.startswith(PREFIX) else "sdpa"
    fn = _inner_function(module, inner)
    state: State | None = getattr(module, "_vislens_state", None)
    if state is None or not state.active():
        return fn(module, query, key, value, attention_mask, **kwargs)
    layer = module.layer_idx
    blocked = None
    for ko in state.knockouts:
        b = ko.blocked(layer, query.shape[2], key.shape[2], query.shape[0], query.device,
                       key_end=state.key_end)
        if b is not None:
            blocked = b if blocked is None else blocked | b
    mask = attention_mask
    if blocked is not None:
        mask = with_blocked(attention_mask, blocked, query, key)
    for cap in state.captures:
        # the logits the inner function computes: its scaling, and its softcap where it has one
        args = (kwargs.get("scaling"), kwargs.get("softcap"))
        if cap.wants_attention(layer, query.shape[2]):
            cap.on_attention(module, layer, query, key, as_additive(mask, query, key), *args)
        else:
            cap.on_attention(module, layer, query, key, None, *args)
    return fn(module, query, key, value, mask, **kwargs)


def with_blocked(mask: torch.Tensor | None, blocked: torch.Tensor, query: torch.Tensor,
                 key: torch.Tensor) -> torch.Tensor:
    """`mask` with the blocked pairs removed, in the mask's own convention.

    Float (eager) masks get -inf added on the pairs; boolean (sdpa) masks get
    False there, which sdpa applies as exactly that additive -inf; None (sdpa's
    is_causal shortcut) becomes the explicit causal mask first. Rows that were
    attendable must keep at least one key, else softmax is undefined.
    """
    if mask is None:
        q_len, k_len = query.shape[2], key.shape[2]
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)
        mask = (q_pos[:, None] >= torch.arange(k_len, device=query.device)[None, :])
        mask = mask.view(1, 1, q_len, k_len)
    if mask.dtype == torch.bool:
        before = mask
        out = mask & ~blocked
        after = out
    else:
        before = mask > torch.finfo(mask.dtype).min
        after = before & ~blocked
        out = mask.masked_fill(blocked, float("-inf"))
    if bool((before.any(-1) & ~after.any(-1)).any()):
        raise ValueError("a knockout blocks every key some query may attend to; keep at least "
                         "one key (e.g. the first token) unblocked")
    return out


def _register() -> None:
    for inner, mask_fn in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(PREFIX + inner, vislens_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX + inner, mask_fn)


_register()


def attach(vlm) -> State:
    """Route the LM's attention through vislens (idempotent); returns the model's state."""
    lm = vlm.language_model
    state = getattr(vlm, "_vislens_state", None)
    if state is None:
        state = State()
        vlm._vislens_state = state
    impl = lm.config._attn_implementation or "sdpa"
    if not impl.startswith(PREFIX):
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"the LM uses {impl!r} attention; vislens interventions need "
                             "'sdpa' or 'eager' (load with attn_implementation='sdpa')")
        lm.config._attn_implementation = PREFIX + impl
    for layer in vlm.layers:
        layer.self_attn._vislens_state = state
    if getattr(lm, "_vislens_counter", None) is None:
        lm._vislens_counter = lm.register_forward_pre_hook(_count_tokens, with_kwargs=True)
    return state


def _count_tokens(module, args, kwargs) -> None:
    """Record, before each LM pass, how many tokens it will have seen: knockout places its
    columns by it where a sliding-window cache hands attention fewer keys than that."""
    layers = getattr(module, "layers", None)
    state = getattr(layers[0].self_attn, "_vislens_state", None) if layers else None
    if state is None:
        return
    embeds = kwargs.get("inputs_embeds")
    tokens = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = 0 if cache is None else int(cache.get_seq_length())
    state.key_end = None if tokens is None else past + int(tokens.shape[1])


def set_inner(vlm, inner: str) -> None:
    """Switch the wrapped implementation ('sdpa' or 'eager'), e.g. to compare the two."""
    if inner not in ("sdpa", "eager"):
        raise ValueError("inner attention must be 'sdpa' or 'eager'")
    attach(vlm)
    vlm.language_model.config._attn_implementation = PREFIX + inner
