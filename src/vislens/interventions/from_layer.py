"""Resume a forward pass at layer s from a cached residual stream.

Knockout sweeps change attention only from their window's first layer on, so
layers below it compute exactly the clean run: cache the clean residual
entering layer s once per sample, then run only layers s..L per condition.
Layers below s are skipped (they return their input) and layer s receives the
cached residual; embeddings, masks and (m)RoPE positions are still built by
the model itself, so positions are those of the clean run. Single forward
passes only (a skipped layer has no KV cache to offer to generate).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from vislens.interventions.ablate import past_length
from vislens.interventions.capture import capture


@torch.no_grad()
def residual_streams(vlm, batch, layers) -> dict[int, torch.Tensor]:
    """Full [B, S, hidden] residual entering each layer in `layers` (num_layers = final)."""
    layers = sorted({int(x) for x in layers})
    wanted = [x for x in layers if x < vlm.num_layers] or [vlm.num_layers - 1]
    cols = [np.arange(batch.seq_len)] * batch.size
    with capture(vlm, cols, layers=wanted) as cap:
        vlm.forward(batch, logits_to_keep=1)
    shape = (batch.size, batch.seq_len, -1)
    return {x: cap.residual[x].view(shape) for x in layers}


@contextmanager
def start_at_layer(vlm, layer: int, hidden: torch.Tensor):
    """Within the context, forward passes start at `layer` from `hidden` [B, S, hidden]."""
    if not 0 <= layer < vlm.num_layers:
        raise ValueError(f"start_at_layer: layer must be in 0..{vlm.num_layers - 1}, got {layer}")
    skipped = list(vlm.layers[:layer])

    def identity(hidden_states, *args, **kwargs):
        return hidden_states

    def inject(module, args, kwargs):
        if past_length(kwargs) > 0:
            raise ValueError("start_at_layer supports single forward passes, not generate")
        current = args[0] if args else kwargs["hidden_states"]
        if tuple(current.shape) != tuple(hidden.shape):
            raise ValueError(f"start_at_layer: hidden is {tuple(hidden.shape)}, the pass needs "
                             f"{tuple(current.shape)}")
        value = hidden.to(current.device, current.dtype)
        if args:
            return (value, *args[1:]), kwargs
        kwargs["hidden_states"] = value
        return args, kwargs

    for mod in skipped:
        mod.forward = identity
    # first among the layer's pre-hooks, so that a capture reads the resumed input
    handle = vlm.layers[layer].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        for mod in skipped:
            del mod.forward
