"""The four benchmarked experiments, each written four ways on the same inputs.

vislens (the library's own way), a plain transformers forward (the
reference cost), nnsight and TransformerLens (TransformerBridge). Every
method returns its result so that `check` can verify they agree before any
ratio is reported.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from vislens.experiments.ablation import AblationConfig, token_sets
from vislens.experiments.batching import repeat_batch
from vislens.experiments.knockout import edge_sets
from vislens.experiments.stats import layer_windows
from vislens.interventions import LAST, capture, knockout
from vislens.interventions.attention_function import PREFIX
from vislens.models.vlm import Batch

TOP_K = 5


def fresh_copy(batch: Batch) -> Batch:
    """The prepared batch without cached image features (so a method pays its vision pass)."""
    return Batch(inputs=dict(batch.inputs), token_map=batch.token_map, texts=list(batch.texts))


def repeat_inputs(inputs: dict, n: int) -> dict:
    """Model inputs repeated over n rows (rivals get no vision reuse: that is the point)."""
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in inputs.items()}


@dataclass
class Context:
    """One sample prepared once; every method starts from a fresh copy of its batch."""

    vlm: object
    batch: Batch
    mask: np.ndarray
    nn: object | None = None
    tl: object | None = None
    knockout_conditions: tuple[str, ...] | None = None
    ablation_conditions: tuple[str, ...] | None = None
    windows: list = field(default_factory=list)

    def fresh(self) -> Batch:
        return fresh_copy(self.batch)

    @property
    def positions(self) -> np.ndarray:
        return self.batch.token_map.image_positions(0)

    def inputs(self, n: int = 1) -> dict:
        return repeat_inputs(self.batch.inputs, n)


@contextmanager
def plain(vlm):
    """The model exactly as transformers ships it: vislens' attention function switched off."""
    lm = vlm.language_model.config
    impl = lm._attn_implementation
    lm._attn_implementation = impl[len(PREFIX):] if impl.startswith(PREFIX) else impl
    try:
        yield
    finally:
        lm._attn_implementation = impl


def plain_forward(ctx: Context, **kwargs):
    with torch.no_grad(), plain(ctx.vlm):
        return ctx.vlm.model(**ctx.batch.inputs, use_cache=False, **kwargs)


# ---- logit lens ---------------------------------------------------------------------------
def _topk(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1).topk(TOP_K, dim=-1).indices


@torch.no_grad()
def lens_floor(ctx: Context) -> torch.Tensor:
    """What a logit lens cannot do with less: one plain forward with hidden states, then one
    batched unembedding (final norm + LM head) and top-k of every image row at every layer."""
    vlm, pos = ctx.vlm, torch.as_tensor(ctx.positions)
    with plain(vlm):
        hidden = vlm.model(**ctx.batch.inputs, use_cache=False, output_hidden_states=True,
                           logits_to_keep=1).hidden_states
    return _topk(vlm.unembed(torch.stack([h[0, pos] for h in hidden])))


@torch.no_grad()
def lens_vislens(ctx: Context) -> torch.Tensor:
    """As experiments/logit_lens: capture image positions, decode one layer at a time."""
    vlm = ctx.vlm
    with capture(vlm, [ctx.positions], residual=True) as cap:
        vlm.forward(ctx.fresh(), logits_to_keep=1)
    return torch.stack([_topk(vlm.unembed(cap.residual[layer]))
                        for layer in range(vlm.num_layers + 1)])


@torch.no_grad()
def lens_nnsight(ctx: Context) -> torch.Tensor:
    nn, pos = ctx.nn, torch.as_tensor(ctx.positions)
    lm = nn.model.language_model
    saved = []
    with nn.trace(**ctx.inputs(), use_cache=False, logits_to_keep=1):
        hidden = [lm.layers[0].input[0, pos]] + [layer.output[0, pos] for layer in lm.layers]
        for h in hidden:
            saved.append(torch.softmax(nn.lm_head(lm.norm(h)).float(), -1)
                         .topk(TOP_K, dim=-1).indices.save())
    return torch.stack([s for s in saved])


@torch.no_grad()
def lens_tl(ctx: Context) -> torch.Tensor:
    tl, pos = ctx.tl, torch.as_tensor(ctx.positions)
    n = ctx.vlm.num_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n)]
    b = ctx.batch.inputs
    _, cache = tl.run_with_cache(b["input_ids"], pixel_values=b["pixel_values"],
                                 attention_mask=b["attention_mask"],
                                 names_filter=lambda name: name in names)
    return torch.stack([_topk(tl.unembed(tl.ln_final(cache[name][0, pos]))) for name in names])


# ---- ablation sweep -----------------------------------------------------------------------
def ablation_sets(ctx: Context) -> tuple[list[str], list[np.ndarray], torch.Tensor]:
    """Every ablation condition but integrated gradients (a gradient pass, not a sweep)."""
    vlm = ctx.vlm
    one = ctx.fresh()
    feats = vlm.image_embeddings(one)
    names = [n for n in AblationConfig().condition_names(len(one.token_map))
             if n != "ig-matched" and (ctx.ablation_conditions is None
                                       or n in ctx.ablation_conditions)]
    cfg = AblationConfig(conditions=names)
    vector = feats[0].float().mean(0).to(vlm.dtype)  # mean post-projector embedding
    sets = token_sets(vlm, one, feats, ctx.mask, cfg, 0, None, vector, 1)
    names = [n for n in names if n in sets]
    return names, [sets[n] for n in names], vector


# Every method runs the clean pass the sweep needs (the clean answer, which the protocol's
# noise filter reads first) plus all conditions.
@torch.no_grad()
def ablate_vislens(ctx: Context, sets, vector) -> torch.Tensor:
    """experiments/ablation as it runs: the clean pass is recorded; each condition runs from
    its first ablated token (rows grouped by start), then the last prompt token."""
    from vislens.experiments.ablation import ablated_prefix
    from vislens.experiments.batching import cut_batch
    from vislens.interventions.continuation import advance, embed, record

    vlm = ctx.vlm
    one = ctx.fresh()
    feats = vlm.image_embeddings(one)
    end = one.seq_len - 1
    clean = record(vlm, cut_batch(one, end), feats)
    advance(vlm, clean.rows(1, end), embed(vlm, one.input_ids[:, end:]))  # the clean answer
    rows = ablated_prefix(vlm, clean, sets, vector)
    last = embed(vlm, one.input_ids[:, end:].expand(len(sets), -1))
    return advance(vlm, rows, last)[:, -1].float()


@torch.no_grad()
def ablate_batched(ctx: Context, sets, vector) -> torch.Tensor:
    """vislens, every condition a full row of one batch (one vision pass): the sweep before
    the conditions ran from their first ablated token."""
    from vislens.interventions import ablate

    vlm = ctx.vlm
    one = ctx.fresh()
    feats = vlm.image_embeddings(one)
    vlm.forward(one, image_features=feats, logits_to_keep=1)  # the clean answer
    rows = repeat_batch(one, len(sets))
    with ablate(vlm, sets, vector):
        out = vlm.forward(rows, image_features=feats * len(sets), logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.no_grad()
def ablate_each(ctx: Context, sets, vector) -> torch.Tensor:
    """vislens, one full forward (vision included) per condition: the naive sweep."""
    from vislens.interventions import ablate

    ctx.vlm.forward(ctx.fresh(), logits_to_keep=1)  # the clean answer
    out = []
    for s in sets:
        with ablate(ctx.vlm, [s], vector):
            out.append(ctx.vlm.forward(ctx.fresh(), logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out)


@torch.no_grad()
def ablate_nnsight(ctx: Context, sets, vector) -> torch.Tensor:
    nn = ctx.nn
    with nn.trace(**ctx.inputs(), use_cache=False, logits_to_keep=1):  # the clean answer
        nn.output.logits.save()
    with nn.trace(**ctx.inputs(len(sets)), use_cache=False, logits_to_keep=1):
        x = nn.model.language_model.layers[0].input
        for i, s in enumerate(sets):
            x[i, torch.as_tensor(s)] = vector
        logits = nn.output.logits[:, -1].float().save()
    return logits


@torch.no_grad()
def ablate_tl(ctx: Context, sets, vector) -> torch.Tensor:
    def hook(resid, hook):
        for i, s in enumerate(sets):
            resid[i, torch.as_tensor(s)] = vector.to(resid.dtype)
        return resid

    clean = ctx.batch.inputs  # the clean answer
    ctx.tl(clean["input_ids"], pixel_values=clean["pixel_values"],
           attention_mask=clean["attention_mask"])
    b = ctx.inputs(len(sets))
    logits = ctx.tl.run_with_hooks(b["input_ids"], pixel_values=b["pixel_values"],
                                   attention_mask=b["attention_mask"],
                                   fwd_hooks=[("blocks.0.hook_resid_pre", hook)])
    return logits[:, -1].float()


# ---- knockout sweep -----------------------------------------------------------------------
# Every method runs the clean pass a sweep needs (the clean answer) plus all conditions.
def knockout_grid(ctx: Context) -> tuple[list[tuple[str, int]], dict]:
    edges = edge_sets(ctx.batch.token_map, ctx.batch, 0, ctx.mask)
    conds = ctx.knockout_conditions or tuple(edges)
    return [(c, w) for c in conds for w in range(len(ctx.windows))], edges


def knockout_windows(num_layers: int, size: int | None = None, stride: int | None = None):
    windows = layer_windows(num_layers, size, stride)
    return windows + [(0, num_layers - 1)]


EMPTY = (LAST, np.zeros(0, dtype=np.int64))


@torch.no_grad()
def knockout_batched(ctx: Context, grid, edges) -> torch.Tensor:
    """Every (condition, window) a row of one batch, no resume (the sweep before resume)."""
    vlm = ctx.vlm
    one = ctx.fresh()
    feats = vlm.image_embeddings(one)
    vlm.forward(one, image_features=feats, logits_to_keep=1)  # the clean answer
    rows = repeat_batch(one, len(grid))
    with ExitStack() as stack:
        for w, (start, end) in enumerate(ctx.windows):
            per_row = [edges[c] if wi == w else EMPTY for c, wi in grid]
            stack.enter_context(knockout(vlm, per_row, range(start, end + 1)))
        logits = vlm.forward(rows, image_features=feats * len(grid), logits_to_keep=1).logits
    return torch.softmax(logits[:, -1].float(), -1)


@torch.no_grad()
def knockout_resumed(ctx: Context, grid, edges) -> torch.Tensor:
    """experiments/knockout as it runs: the clean pass records every layer's keys and values
    and the residual entering each window's first layer; rows grouped by (window start,
    first blocked query) run only those positions of those layers."""
    from vislens.experiments import knockout as experiment

    vlm = ctx.vlm
    one = ctx.fresh()
    feats = vlm.image_embeddings(one)
    _, cached = experiment.clean_pass(vlm, one, feats, [s for s, _ in ctx.windows])
    return experiment.sweep(vlm, one, feats, edges, grid, ctx.windows, cached)[:, -1]


@torch.no_grad()
def knockout_each(ctx: Context, grid, edges) -> torch.Tensor:
    """vislens, one full forward (vision included) per (condition, window): the naive sweep."""
    ctx.vlm.forward(ctx.fresh(), logits_to_keep=1)  # the clean answer
    out = []
    for c, w in grid:
        s, e = ctx.windows[w]
        with knockout(ctx.vlm, [edges[c]], range(s, e + 1)):
            logits = ctx.vlm.forward(ctx.fresh(), logits_to_keep=1).logits
        out.append(torch.softmax(logits[:, -1].float(), -1))
    return torch.cat(out)


def _blocked(ctx: Context, grid, edges, layer: int) -> torch.Tensor | None:
    """[rows, S, S] pairs blocked in `layer` (what a hand-written sweep has to build)."""
    seq = ctx.batch.seq_len
    out = torch.zeros(len(grid), seq, seq, dtype=torch.bool)
    any_ = False
    for i, (c, w) in enumerate(grid):
        s, e = ctx.windows[w]
        if not s <= layer <= e:
            continue
        queries, keys = edges[c]
        k = torch.as_tensor(np.asarray(keys, dtype=np.int64))
        if not len(k):
            continue
        q = torch.tensor([seq - 1]) if isinstance(queries, str) else torch.as_tensor(queries)
        out[i, q[:, None], k[None, :]] = True
        any_ = True
    return out if any_ else None


@torch.no_grad()
def knockout_nnsight(ctx: Context, grid, edges) -> torch.Tensor:
    nn = ctx.nn
    seq, n = ctx.batch.seq_len, len(grid)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    masks = {}
    for layer in range(ctx.vlm.num_layers):
        blocked = _blocked(ctx, grid, edges, layer)
        if blocked is not None:
            masks[layer] = (causal[None] & ~blocked)[:, None].to(ctx.batch.input_ids.device)
    with nn.trace(**ctx.inputs(), use_cache=False, logits_to_keep=1):  # the clean answer
        nn.output.logits.save()
    with nn.trace(**ctx.inputs(n), use_cache=False, logits_to_keep=1):
        for layer, module in enumerate(nn.model.language_model.layers):
            if layer in masks:
                args, kwargs = module.self_attn.inputs
                kwargs["attention_mask"] = masks[layer]
                module.self_attn.inputs = (args, kwargs)
        probs = torch.softmax(nn.output.logits[:, -1].float(), -1).save()
    return probs


@torch.no_grad()
def knockout_tl(ctx: Context, grid, edges) -> torch.Tensor:
    hooks = []
    for layer in range(ctx.vlm.num_layers):
        blocked = _blocked(ctx, grid, edges, layer)
        if blocked is None:
            continue

        def hook(scores, hook, blocked=blocked):
            return scores.masked_fill(blocked[:, None].to(scores.device), float("-inf"))
        hooks.append((f"blocks.{layer}.attn.hook_attn_scores", hook))
    clean = ctx.batch.inputs  # the clean answer
    ctx.tl(clean["input_ids"], pixel_values=clean["pixel_values"],
           attention_mask=clean["attention_mask"])
    b = ctx.inputs(len(grid))
    logits = ctx.tl.run_with_hooks(b["input_ids"], pixel_values=b["pixel_values"],
                                   attention_mask=b["attention_mask"], fwd_hooks=hooks)
    return torch.softmax(logits[:, -1].float(), -1)


# ---- key / value capture (perceive) -------------------------------------------------------
@torch.no_grad()
def kv_vislens(ctx: Context) -> torch.Tensor:
    vlm = ctx.vlm
    with capture(vlm, [ctx.positions], residual=False, keys="pre", values=True) as cap:
        vlm.forward(ctx.fresh(), logits_to_keep=1)
    return torch.stack([torch.stack([cap.keys_pre[i].flatten(1), cap.values[i].flatten(1)])
                        for i in range(vlm.num_layers)])


@torch.no_grad()
def kv_nnsight(ctx: Context) -> torch.Tensor:
    nn, pos = ctx.nn, torch.as_tensor(ctx.positions)
    saved = []
    with nn.trace(**ctx.inputs(), use_cache=False, logits_to_keep=1):
        for layer in nn.model.language_model.layers:
            k = layer.self_attn.k_proj.output[0, pos].save()
            v = layer.self_attn.v_proj.output[0, pos].save()
            saved.append((k, v))
    return torch.stack([torch.stack([k, v]) for k, v in saved])


@torch.no_grad()
def kv_tl(ctx: Context) -> torch.Tensor:
    pos = torch.as_tensor(ctx.positions)
    n = ctx.vlm.num_layers
    names = [f"blocks.{i}.attn.{kv}.hook_out" for i in range(n) for kv in "kv"]
    b = ctx.batch.inputs
    _, cache = ctx.tl.run_with_cache(b["input_ids"], pixel_values=b["pixel_values"],
                                     attention_mask=b["attention_mask"],
                                     names_filter=lambda name: name in names)
    return torch.stack([torch.stack([cache[f"blocks.{i}.attn.k.hook_out"][0, pos].flatten(1),
                                     cache[f"blocks.{i}.attn.v.hook_out"][0, pos].flatten(1)])
                        for i in range(n)])



# ---- activation patching sweep ------------------------------------------------------------
# Every method runs the clean pass (keeping the residual entering every layer), the
# corrupted pass, and the residual of each layer restored at each token group.
def patch_setup(ctx: Context) -> tuple[Batch, list[np.ndarray]]:
    """The corrupted batch (the image's pixels noised: the same token layout) and six token
    groups: object, object+1, the rest of the image, the last image row, the text after
    the image, the answer position."""
    b, tm = ctx.batch, ctx.batch.token_map
    pixels = b.inputs["pixel_values"]
    noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    corrupt = Batch(inputs={**b.inputs, "pixel_values": pixels + noise.to(pixels)},
                    token_map=tm, texts=list(b.texts))
    obj = tm.positions(0, ctx.mask)
    obj1, image = tm.dilate(obj, 1, 0), tm.image_positions(0)
    sets = [obj, obj1, np.setdiff1d(image, obj1), tm.last_row(0),
            np.arange(tm.image_end(0) + 1, b.seq_len), np.array([b.seq_len - 1])]
    return corrupt, sets


@torch.no_grad()
def _patch_sweep(ctx: Context, corrupt: Batch, sets, continued: bool) -> torch.Tensor:
    from vislens.experiments.patching import Corrupted
    from vislens.interventions import record_sites, site_grid

    vlm = ctx.vlm
    layers = list(range(vlm.num_layers))
    source = record_sites(vlm, ctx.fresh(), site_grid("residual", layers), logits_to_keep=1)
    one = fresh_copy(corrupt)
    if continued:
        run = Corrupted.of(vlm, source, one, layers, chunk=64)
    else:
        run = Corrupted(vlm, source, one, vlm.image_embeddings(one), None, None, 64)
    run.last_logits()
    return torch.cat([run.logits("residual", layer, sets) for layer in layers])


def patch_vislens(ctx: Context, corrupt: Batch, sets) -> torch.Tensor:
    """experiments/patching as it runs: the corrupted pass recorded, each layer's groups
    continued from that layer and their first restored column (rows grouped by it)."""
    return _patch_sweep(ctx, corrupt, sets, continued=True)


def patch_whole(ctx: Context, corrupt: Batch, sets) -> torch.Tensor:
    """vislens, every group a full row of one batch per layer (one vision pass): the sweep
    before the corrupted pass was continued."""
    return _patch_sweep(ctx, corrupt, sets, continued=False)


@torch.no_grad()
def patch_nnsight(ctx: Context, corrupt: Batch, sets) -> torch.Tensor:
    nn, n = ctx.nn, len(sets)
    layers = nn.model.language_model.layers
    clean, out = [], []
    with nn.trace(**ctx.inputs(), use_cache=False, logits_to_keep=1):
        for layer in layers:
            clean.append(layer.input.save())
    with nn.trace(**corrupt.inputs, use_cache=False, logits_to_keep=1):
        nn.output.logits.save()
    for i, layer in enumerate(layers):
        with nn.trace(**repeat_inputs(corrupt.inputs, n), use_cache=False, logits_to_keep=1):
            x = layer.input
            for row, s in enumerate(sets):
                cols = torch.as_tensor(s)
                x[row, cols] = clean[i][0, cols]
            out.append(nn.output.logits[:, -1].float().save())
    return torch.cat(out)


@torch.no_grad()
def patch_tl(ctx: Context, corrupt: Batch, sets) -> torch.Tensor:
    tl, n = ctx.tl, len(sets)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(ctx.vlm.num_layers)]
    b = ctx.batch.inputs
    _, cache = tl.run_with_cache(b["input_ids"], pixel_values=b["pixel_values"],
                                 attention_mask=b["attention_mask"],
                                 names_filter=lambda name: name in names)
    c = corrupt.inputs
    tl(c["input_ids"], pixel_values=c["pixel_values"], attention_mask=c["attention_mask"])
    rows = repeat_inputs(c, n)
    out = []
    for name in names:
        def hook(resid, hook, name=name):
            for row, s in enumerate(sets):
                cols = torch.as_tensor(s)
                resid[row, cols] = cache[name][0, cols].to(resid.dtype)
            return resid
        logits = tl.run_with_hooks(rows["input_ids"], pixel_values=rows["pixel_values"],
                                   attention_mask=rows["attention_mask"],
                                   fwd_hooks=[(name, hook)])
        out.append(logits[:, -1].float())
    return torch.cat(out)
