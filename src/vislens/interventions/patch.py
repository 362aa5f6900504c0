"""Activation patching: put a clean run's activations back into a corrupted run.

Causal tracing asks which activations carry what the clean input has and the corrupted
one lacks: run the corrupted input, restore one activation of the clean run, and see how
much of the clean answer comes back. The two runs must line up column for column, so the
batches must have the same token layout (same prompt length, image tokens at the same
columns with the same grid): an image of another size would move, add or drop image
tokens (any-res families read their token count and grid from the size) and give mRoPE
families other positions. `patch` refuses such a pair with one line saying so.

Sites (what is restored), for decoder layer l:
  residual  the residual stream entering layer l (0 = the LM's input embeddings after any
            ablation); l = num_layers is the last layer's output before the final norm,
            as in `capture`. Restoring every column at any l gives the clean logits,
            except below the last DeepStack injection (see below).
  attn      layer l's self-attention output (o_proj's), what the layer adds to the
            residual (Gemma 3 normalises it first; that norm acts per position, so
            restoring its input restores what is added).
  mlp       layer l's MLP output (likewise, before Gemma 3's post-feedforward norm).

Hooks: a residual site is a forward pre-hook on its layer (the last layer's forward hook
for num_layers), attn / mlp a forward hook on the module, each registered first among its
module's hooks, so a `capture` opened inside or outside the patch reads the restored
value; ablation (on the LM's input) comes before every layer, so patching the residual at
layer 0 wins over it there; knockout acts inside attention and composes as usual. Only
the prompt pass is patched (under generate: the prefill), never generated tokens.

DeepStack (Qwen3-VL adds its k-th set of image features to the image positions of layer
k's output, k = 0, 1, 2): the residual entering layer l holds the additions k < l (the
one made after layer l - 1 included) and not those k >= l, which the corrupted run takes
from its own image.
Restoring it alone below the last injection therefore leaves the corrupted image in the
model; `injected=True` also restores those later additions (the clean run's) at the
patched columns, after which every column restored at any layer gives the clean logits.
The choice is the caller's to make: below the last injection, patch asks for it.

Attribution patching (`attribution`) approximates, to first order, the effect of restoring
each (layer, column) at once: (clean - corrupted activation) . d metric / d activation,
the gradient taken in the corrupted run: one clean pass, one corrupted pass and one
backward pass for every layer and column, instead of one pass per site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from vislens.errors import VislensError
from vislens.interventions.ablate import past_length
from vislens.interventions.capture import capture
from vislens.interventions.continuation import Recorded, advance

KINDS = ("residual", "attn", "mlp")


@dataclass(frozen=True)
class Site:
    """One activation of every column: `kind` in KINDS at decoder layer `layer`."""

    kind: str
    layer: int


def site_grid(kinds: str | Iterable[str], layers: Iterable[int]) -> list[Site]:
    """Every (kind, layer) pair, kinds outermost: the sites a sweep over layers needs."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    return [Site(k, int(layer)) for k in kinds for layer in layers]


def _sites(vlm, given) -> list[Site]:
    """Sites from Site objects or (kind, layer) pairs, checked against the model's depth."""
    if isinstance(given, Site) or (isinstance(given, tuple) and len(given) == 2
                                   and isinstance(given[0], str)):
        given = [given]
    out = []
    for s in given:
        s = s if isinstance(s, Site) else Site(str(s[0]), int(s[1]))
        if s.kind not in KINDS:
            raise ValueError(f"site kind must be one of {', '.join(KINDS)}, got {s.kind!r}")
        top = vlm.num_layers if s.kind == "residual" else vlm.num_layers - 1
        if not 0 <= s.layer <= top:
            raise ValueError(f"{s.kind} site layer {s.layer} out of range 0..{top}")
        if s not in out:
            out.append(s)
    return out


# ---- layouts ---------------------------------------------------------------------------------
class LayoutMismatch(VislensError, ValueError):
    """Clean and corrupted batches whose columns do not correspond."""


@dataclass(frozen=True)
class _Layout:
    """What must agree, column for column, between a clean row and a corrupted row."""

    real: tuple  # attention mask: sequence length and left padding
    image: tuple  # image patch columns
    cells: tuple  # their (image, tile, row, col)
    other: tuple  # newline and marker columns
    grids: tuple  # per image: tile -> (rows, cols)


def layouts(batch) -> list[_Layout]:
    """One layout per row; a repeated one-sample batch (`repeat_batch`) shares its map."""
    tm = batch.token_map
    n_map = len(tm.grids)
    if n_map not in (batch.size, 1):
        raise ValueError(f"token map of {n_map} samples for a batch of {batch.size}")
    mask = batch.attention_mask.detach().cpu().numpy().astype(bool)
    out = []
    for b in range(batch.size):
        s = b if n_map == batch.size else 0
        sel = tm.batch == s
        cells = np.stack([tm.image[sel], tm.tile[sel], tm.row[sel], tm.col[sel]], 1)
        other = np.concatenate([tm.newline_positions(s), [-1], tm.marker_positions(s)])
        grids = tuple(tuple(sorted(g.items())) for g in tm.image_grids[s])
        out.append(_Layout(tuple(mask[b].tolist()), tuple(tm.position[sel].tolist()),
                           tuple(map(tuple, cells.tolist())), tuple(other.tolist()), grids))
    return out


_WHAT = {"real": "a different length or padding (another prompt length)",
         "image": "image tokens at other columns or a different number of them",
         "cells": "image tokens in another grid", "other": "newline or marker tokens "
         "at other columns", "grids": "another image grid (an image of another size)"}


def check_layout(clean: list[_Layout], corrupt: list[_Layout]) -> None:
    """Raise LayoutMismatch (a ValueError) naming the first difference, if any."""
    fix = ("patching needs the same token layout in both runs: use the same prompt and give "
           "the corrupted image the clean image's size (any-res families take their image "
           "token count and grid from it)")
    if len(clean) != len(corrupt):
        raise LayoutMismatch(f"clean run has {len(clean)} rows, corrupted run {len(corrupt)}; "
                             f"{fix}")
    for b, (a, c) in enumerate(zip(clean, corrupt)):
        if len(a.real) != len(c.real):
            raise LayoutMismatch(f"clean sequence length {len(a.real)} != corrupted "
                                 f"{len(c.real)} (row {b}); {fix}")
        for name in ("real", "image", "cells", "other", "grids"):
            if getattr(a, name) != getattr(c, name):
                raise LayoutMismatch(f"row {b} of the corrupted batch has {_WHAT[name]}; {fix}")


# ---- recording -------------------------------------------------------------------------------
@dataclass
class Activations:
    """A run's activations at whole sites ([B, S, hidden] each), for patching into another.

    layouts: the rows' token layouts (checked against the run patched into).
    logits: the run's logits (what `record_sites` was told to keep).
    injected: DeepStack families only: per row, per injection layer, the features added
    at the row's image positions ([n_image_positions, hidden], column order).
    """

    values: dict[Site, torch.Tensor]
    layouts: list[_Layout]
    logits: torch.Tensor | None = None
    injected: list[list[torch.Tensor]] | None = None

    def __getitem__(self, site) -> torch.Tensor:
        site = site if isinstance(site, Site) else Site(*site)
        if site not in self.values:
            raise KeyError(f"no {site.kind} recorded at layer {site.layer}; record_sites "
                           f"recorded {sorted((s.kind, s.layer) for s in self.values)}")
        return self.values[site]

    @property
    def size(self) -> int:
        return len(self.layouts)

    def select(self, rows: Sequence[int]) -> Activations:
        """These rows (repeat a row to patch several conditions of one pair in one batch)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        pick = [self.layouts[int(i)] for i in idx]
        values = {s: v.index_select(0, idx.to(v.device)) for s, v in self.values.items()}
        logits = None if self.logits is None else \
            self.logits.index_select(0, idx.to(self.logits.device))
        injected = None if self.injected is None else [self.injected[int(i)] for i in idx]
        return Activations(values, pick, logits, injected)

    def mixed(self, other: Activations, weight: float) -> Activations:
        """Activations (1 - weight) * self + weight * other, site by site (the path between
        two runs' activations that attribution patching differentiates along)."""
        values = {s: torch.lerp(v, other[s].to(v.device, v.dtype), weight)
                  for s, v in self.values.items()}
        injected = None if self.injected is None or other.injected is None else [
            [torch.lerp(a, b, weight) for a, b in zip(mine, theirs)]
            for mine, theirs in zip(self.injected, other.injected)]
        return Activations(values, self.layouts, None, injected)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _module(vlm, site: Site) -> torch.nn.Module:
    layer = vlm.layers[site.layer]
    return layer.self_attn if site.kind == "attn" else layer.mlp


@torch.no_grad()
def record_sites(vlm, batch, sites, **forward_kwargs) -> Activations:
    """Run `batch` once and keep every column of the given sites (and its logits).

    forward_kwargs go to `vlm.forward` (e.g. logits_to_keep=1 keeps only the last
    position's logits). Memory: one [B, S, hidden] tensor per site; record the layers a
    sweep needs, not every layer, on a large model.
    """
    wanted = _sites(vlm, sites)
    values: dict[Site, torch.Tensor] = {}
    handles = []
    for s in wanted:
        if s.kind != "residual":
            handles.append(_module(vlm, s).register_forward_hook(
                lambda m, a, o, s=s: values.__setitem__(s, _output(o).detach())))
    injected: dict = {}
    if vlm.family.deepstack:
        def grab(module, args, kwargs):
            if kwargs.get("deepstack_visual_embeds") is not None:
                injected["mask"] = kwargs["visual_pos_masks"]
                injected["layers"] = [f.detach() for f in kwargs["deepstack_visual_embeds"]]
        # last among the LM's pre-hooks: what the layers will receive, after any ablation
        handles.append(vlm.language_model.register_forward_pre_hook(grab, with_kwargs=True))
    residual = sorted({s.layer for s in wanted if s.kind == "residual"})
    L = vlm.num_layers
    cap_layers = [x for x in residual if x < L] + ([L - 1] if L in residual else [])
    cols = [np.arange(batch.seq_len)] * batch.size
    ctx = capture(vlm, cols, layers=cap_layers) if residual else nullcontext()
    try:
        with ctx as cap:
            out = vlm.forward(batch, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    shape = (batch.size, batch.seq_len, -1)
    for x in residual:
        values[Site("residual", x)] = cap.residual[x].view(shape)
    values = {s: values[s] for s in wanted}
    per_row = None
    if injected:
        counts = injected["mask"].sum(1).tolist()
        per_row = [list(rows) for rows in zip(*(f.split(counts) for f in injected["layers"]))]
    return Activations(values, layouts(batch), out.logits.detach(), per_row)


# ---- patching --------------------------------------------------------------------------------
def _columns(positions, size: int, seq_len: int) -> list[torch.Tensor]:
    if positions is None:
        return [torch.arange(seq_len)] * size
    if len(positions) != size:
        raise ValueError(f"patch was given positions for {len(positions)} samples, the batch "
                         f"has {size}; give one sequence of columns per sample")
    out = []
    for p in positions:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().numpy()
        idx = torch.as_tensor(np.unique(np.asarray(p, dtype=np.int64).ravel()))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= seq_len):
            raise ValueError(f"patch column out of range 0..{seq_len - 1}")
        out.append(idx)
    return out


@dataclass
class Patch:
    """An open patch: `applied` counts the prompt passes each site was restored in (a site
    that never ran, e.g. under a shortcut that skips its layer, shows as 0)."""

    sites: list[Site]
    columns: list[torch.Tensor]
    applied: dict[Site, int] = field(default_factory=dict)
    injected_applied: int = 0


@contextmanager
def patch(vlm, source: Activations, target, sites, positions=None,
          injected: bool | None = None):
    """Restore `source`'s activations at `sites` and `positions` in passes of `target`.

    source: `record_sites` of the clean batch (rows matched to target's rows; use
    `source.select` to repeat a pair over several rows). target: the Batch that will
    run inside the context (its token layout is checked against the source's).
    sites: Site objects or (kind, layer) pairs; positions: one sequence of columns per
    row, restored at every site (None: every column). injected: DeepStack families
    only, with a residual site below the last injection: whether the clean run's later
    additions at the patched columns are restored too (see the module docstring).
    """
    wanted = _sites(vlm, sites)
    for s in wanted:
        source[s]  # noqa: B018 (raises KeyError naming what was recorded)
    check_layout(source.layouts, layouts(target))
    B, S = target.size, target.seq_len
    cols = _columns(positions, B, S)
    flat = torch.cat([b * S + c for b, c in enumerate(cols)])
    handle = Patch(wanted, cols, {s: 0 for s in wanted})
    state = {"prompt": False}
    device_rows: dict = {}

    def restore(site: Site, hidden: torch.Tensor) -> torch.Tensor:
        if tuple(hidden.shape[:2]) != (B, S):
            raise ValueError(f"patch was set up for {B} x {S} positions, the pass has "
                             f"{tuple(hidden.shape[:2])}")
        rows = device_rows.get(hidden.device)
        if rows is None:
            rows = device_rows[hidden.device] = flat.to(hidden.device)
        clean = source[site].reshape(B * S, -1).index_select(0, rows.to(source[site].device))
        out = hidden.clone(memory_format=torch.contiguous_format)
        out.view(B * S, -1).index_copy_(0, rows, clean.to(hidden.device, hidden.dtype))
        handle.applied[site] += 1
        return out

    def start(module, args, kwargs):
        state["prompt"] = past_length(kwargs) == 0

    def before(module, args, kwargs, site):
        if not state["prompt"]:
            return None
        if args:
            return (restore(site, args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = restore(site, kwargs["hidden_states"])
        return args, kwargs

    def after(module, args, output, site):
        if not state["prompt"]:
            return None
        if isinstance(output, tuple):
            return (restore(site, output[0]), *output[1:])
        return restore(site, output)

    restore_from = _injection_choice(vlm, source, wanted, injected)
    lm = vlm.language_model
    hooks, unwrap = [], None
    try:
        hooks.append(lm.register_forward_pre_hook(start, with_kwargs=True, prepend=True))
        for s in wanted:
            if s.kind == "residual" and s.layer < vlm.num_layers:
                hooks.append(vlm.layers[s.layer].register_forward_pre_hook(
                    lambda m, a, k, s=s: before(m, a, k, s), with_kwargs=True, prepend=True))
            else:
                module = vlm.layers[-1] if s.kind == "residual" else _module(vlm, s)
                hooks.append(module.register_forward_hook(
                    lambda m, a, o, s=s: after(m, a, o, s), prepend=True))
        if restore_from is not None:
            unwrap = _wrap_injection(lm, source, cols, restore_from, state, handle)
        yield handle
    finally:
        for h in hooks:
            h.remove()
        if unwrap is not None:
            unwrap()


def _injection_choice(vlm, source: Activations, wanted: list[Site], injected: bool | None
                      ) -> int | None:
    """The first injection layer whose clean additions are restored, or None for none."""
    if not vlm.family.deepstack:
        return None
    n = len(source.injected[0]) if source.injected else 0
    below = [s.layer for s in wanted if s.kind == "residual" and s.layer < n]
    if not below:
        return None
    if injected is None:
        raise ValueError(f"{vlm.family.label} adds image features to the residual after each "
                         f"of its first {n} layers (DeepStack); restoring the residual entering "
                         f"layer {min(below)} leaves the later additions of the run's own image: "
                         "pass injected=True to restore those too (the clean run's), or "
                         "injected=False to keep them")
    return min(below) if injected else None


def _wrap_injection(lm, source: Activations, cols: list[torch.Tensor], first: int, state: dict,
                    handle: Patch):
    """Swap the clean additions in where the LM adds them (its `_deepstack_process`, after
    every pre-hook, so an ablation of the injected features does not undo the restore)."""
    original = lm.__dict__.get("_deepstack_process")
    inner = lm._deepstack_process
    calls = {"n": 0}

    def start(module, args, kwargs):
        calls["n"] = 0

    def process(hidden, mask, embeds):
        k = calls["n"]
        calls["n"] += 1
        if state["prompt"] and k >= first:
            embeds = embeds.clone()
            rank = mask.flatten().long().cumsum(0).view(mask.shape) - 1
            for b, c in enumerate(cols):
                c = c.to(mask.device)
                hit = mask[b, c]
                if not bool(hit.any()):
                    continue
                local = (mask[b].long().cumsum(0) - 1)[c[hit]]
                clean = source.injected[b][k]
                embeds[rank[b, c[hit]].to(embeds.device)] = \
                    clean[local.to(clean.device)].to(embeds.device, embeds.dtype)
            handle.injected_applied += 1
        return inner(hidden, mask, embeds)

    hook = lm.register_forward_pre_hook(start, with_kwargs=True)
    lm._deepstack_process = process

    def unwrap():
        hook.remove()
        if original is None:
            del lm._deepstack_process
        else:
            lm._deepstack_process = original

    return unwrap


# ---- continuing the corrupted run -------------------------------------------------------------
@torch.no_grad()
def patch_continued(vlm, source: Activations, target, corrupted: Recorded, site,
                    positions: Sequence, keep: int = 1) -> torch.Tensor:
    """Logits [n, keep, vocab] of n rows, row b the one-row run `target` with `site` restored
    at its own columns positions[b]: what `patch` over a repeated `target` gives, computed
    only where the restore can change anything.

    Restoring layer l at columns c.. leaves every layer below l and every column before the
    first restored one p as in the corrupted run (no column reads a later one), so the
    rows continue `corrupted` (`continuation.record` of `target`, with the residual
    entering `site.layer` kept unless the layer is 0) from position p and layer l: the
    corrupted residual entering l at p.., the clean activation put back at the restored
    columns. Families whose recorded pass cannot be continued (`corrupted.reusable` false:
    bidirectional image blocks, a prefix LM, DeepStack, sliding windows) take `patch`.
    source: `record_sites` of the clean batch (one row, or n matched to the rows).
    """
    (site,) = _sites(vlm, [site])
    if not corrupted.reusable:
        raise ValueError(f"the corrupted pass cannot be continued ({corrupted.why_not}); "
                         "use patch() over the whole pass")
    if site.layer >= vlm.num_layers:
        raise ValueError("the residual after the last layer is patched by patch(), not "
                         "continued")
    check_layout(source.layouts, layouts(target))
    if target.size != 1:
        raise ValueError(f"patch_continued continues a one-row run, got {target.size} rows")
    n, S = len(positions), corrupted.seq_len
    cols = _columns(positions, n, S)
    clean = source[site]
    if clean.shape[0] not in (1, n):
        raise ValueError(f"the clean activations have {clean.shape[0]} rows for {n} rows")
    p = min([int(c.min()) for c in cols if c.numel()], default=S - 1)
    if keep > S - p:
        raise ValueError(f"keep={keep} reaches before column {p}, the first restored one: "
                         "those logits are the corrupted run's (keep at most "
                         f"{S - p} here)")
    layer = site.layer
    if layer and layer not in corrupted.residual:
        raise ValueError(f"record the corrupted run with residual_layers including {layer}")
    base = corrupted.embeds if layer == 0 else corrupted.residual[layer]
    hidden = base[:, p:].expand(n, -1, -1).clone()

    def put(values: torch.Tensor) -> torch.Tensor:
        """values [n, S - p, hidden] with the clean columns of every row restored."""
        values = values.clone()
        for b, c in enumerate(cols):
            if c.numel():
                row = clean[b if clean.shape[0] == n else 0]
                values[b, (c - p).to(values.device)] = \
                    row[c.to(row.device)].to(values.device, values.dtype)
        return values

    hook = None
    if site.kind == "residual":
        hidden = put(hidden)
    else:
        hook = _module(vlm, site).register_forward_hook(
            lambda m, a, o: (put(o[0]), *o[1:]) if isinstance(o, tuple) else put(o),
            prepend=True)
    try:
        return advance(vlm, corrupted.rows(n, p), hidden, layer=layer, keep=keep,
                       **corrupted.after(p))
    finally:
        if hook is not None:
            hook.remove()


# ---- metrics ---------------------------------------------------------------------------------
def logit_difference(answer, foil) -> Callable[[torch.Tensor], torch.Tensor]:
    """Metric: logit of the answer token minus that of the foil at the last position, per
    row ([B]); answer / foil: one token id for every row or one per row. Left padding puts
    every row's last token in the last column."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        rows = torch.arange(last.shape[0], device=last.device)
        a = torch.as_tensor(answer, device=last.device).expand(last.shape[0])
        f = torch.as_tensor(foil, device=last.device).expand(last.shape[0])
        return last[rows, a] - last[rows, f]
    return metric


def restored_share(patched, clean, corrupt) -> torch.Tensor:
    """(patched - corrupt) / (clean - corrupt): 0 = nothing of the clean difference came
    back, 1 = all of it. NaN where clean equals corrupt (nothing to restore)."""
    patched, clean, corrupt = (torch.as_tensor(x, dtype=torch.float64)
                               for x in (patched, clean, corrupt))
    gap = clean - corrupt
    return torch.where(gap == 0, torch.full_like(gap, float("nan")),
                       (patched - corrupt) / torch.where(gap == 0, torch.ones_like(gap), gap))


# ---- attribution patching --------------------------------------------------------------------
@dataclass
class Attribution:
    """First-order estimates of the metric's change when one site's column is restored.

    effects[kind]: [B, len(layers), S]; clean / corrupt: the metric of each run ([B]).
    """

    layers: list[int]
    effects: dict[str, torch.Tensor]
    clean: torch.Tensor
    corrupt: torch.Tensor

    def at(self, kind: str, sample: int, positions=None) -> torch.Tensor:
        """[layers, positions] of one row (all columns when positions is None)."""
        table = self.effects[kind][sample]
        if positions is None:
            return table
        idx = torch.as_tensor(np.asarray(positions, dtype=np.int64).ravel())
        return table[:, idx.to(table.device)]

    def share(self, kind: str) -> torch.Tensor:
        """Effects as estimated shares of the clean-vs-corrupted metric gap restored."""
        gap = (self.clean - self.corrupt).to(self.effects[kind].dtype)
        return self.effects[kind] / gap[:, None, None]


def attribution(vlm, clean, corrupt, metric: Callable[[torch.Tensor], torch.Tensor],
                layers: Iterable[int] | None = None,
                kinds: Iterable[str] = ("residual",)) -> Attribution:
    """Attribution patching of every column of `kinds` at `layers` (None: 0..L-1).

    clean: the clean Batch, or its `record_sites` (the needed sites and last-position
    logits). corrupt: the corrupted Batch. metric: logits [B, 1, vocab] -> [B] (e.g.
    `logit_difference`). The gradient is of the corrupted run, so an effect is exact for
    metrics linear in the activation and a first-order estimate otherwise. For DeepStack
    it is the effect of restoring the residual alone (injected=False). The corrupted
    batch's image features are computed once and cached on it (as `vlm.image_embeddings`
    does), so the backward pass never enters the vision tower.
    """
    L = vlm.num_layers
    layers = list(range(L)) if layers is None else sorted({int(x) for x in layers})
    kinds = list(kinds)
    wanted = _sites(vlm, [Site(k, x) for k in kinds for x in layers])
    source = clean if isinstance(clean, Activations) else \
        record_sites(vlm, clean, wanted, logits_to_keep=1)
    for s in wanted:
        source[s]  # noqa: B018 (raises KeyError naming what was recorded)
    if source.logits is None:
        raise ValueError("the clean activations hold no logits; record them with record_sites")
    check_layout(source.layouts, layouts(corrupt))
    vlm.image_embeddings(corrupt)  # the vision pass once, without a graph
    taps: dict[Site, torch.Tensor] = {}
    state = {"prompt": False}

    def leaf(module, args, kwargs):
        state["prompt"] = past_length(kwargs) == 0
        embeds = kwargs.get("inputs_embeds")
        if state["prompt"] and embeds is not None:
            kwargs["inputs_embeds"] = embeds.detach().requires_grad_(True)
            return args, kwargs
        return None

    def tap(site, hidden):
        if state["prompt"]:
            taps[site] = hidden

    lm = vlm.language_model
    hooks = [lm.register_forward_pre_hook(leaf, with_kwargs=True, prepend=True)]
    for s in wanted:
        if s.kind == "residual" and s.layer < L:
            hooks.append(vlm.layers[s.layer].register_forward_pre_hook(
                lambda m, a, k, s=s: tap(s, a[0] if a else k["hidden_states"]),
                with_kwargs=True))
        else:
            module = vlm.layers[-1] if s.kind == "residual" else _module(vlm, s)
            hooks.append(module.register_forward_hook(lambda m, a, o, s=s: tap(s, _output(o))))
    try:
        out = vlm.forward(corrupt, grad=True, logits_to_keep=1)
        value = metric(out.logits)
        grads = torch.autograd.grad(value.sum(), [taps[s] for s in wanted], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    # float32 at least (a half-precision dot product over hidden would round the effects)
    dtype = torch.promote_types(value.dtype, torch.float32)
    effects = {k: torch.zeros(corrupt.size, len(layers), corrupt.seq_len, dtype=dtype)
               for k in kinds}
    for s, g in zip(wanted, grads):
        if g is None:
            continue
        act = taps[s].detach().to(dtype)
        diff = source[s].to(act.device, dtype) - act
        effects[s.kind][:, layers.index(s.layer)] = (diff * g.to(dtype)).sum(-1).cpu()
    with torch.no_grad():
        clean_metric = metric(source.logits).detach().to(dtype).cpu()
    return Attribution(layers, effects, clean_metric, value.detach().to(dtype).cpu())
