"""Liu et al. B1: zero-shot perception from image keys / values in each LM layer,
against the projector output (LM input) and the vision encoder output.

Each task item is one row (condition, task, item) holding, for every source, the
statistics its score needs (intersections and unions, matched points, ...), so a
rerun resumes and the summary is recomputed from rows. The image-only tasks use a
neutral prompt: image tokens come before the text, so their keys / values depend on
the text only through a prefix (see prefix.py).

Statistics are honest by construction:
- one split per task, by item and stratified by class (seeded: `stats.selection_split`): the
  layer reported for keys / values is chosen on the selection half, and every source
  (that layer, the projector output, the vision encoder, the chance levels) is
  reported on the held-out half, with its item count (the best layer on the held-out
  half is reported only as a labelled upper bound);
- scores are at PIXEL level (token predictions painted onto the pixels their boxes
  cover, uncovered pixels = background; see metrics.py); the token-level score of the
  same split is the labelled variant "token_level";
- co-seg and ref-seg choose their object without ground truth, and sem-seg chooses
  among all the data set's classes; the variants told the answer are reported beside
  them as "co-seg-oracle" / "ref-seg-oracle" / "sem-seg-oracle" (classes present);
- chance levels (all-background, all-foreground, random class / token) are scored on
  the same held-out items; every score carries a 95% bootstrap interval over items.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict, cast

import numpy as np

from vislens.data.resolve import open_task
from vislens.experiments.perception import metrics as M
from vislens.experiments.perception.features import SOURCES, ImageFeatures, extract
from vislens.experiments.stats import bootstrap_metric, choose_layer, selection_split
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor

ORACLES = {"co-seg": "co-seg-oracle", "ref-seg": "ref-seg-oracle",  # GT-matched variants
           "sem-seg": "sem-seg-oracle"}  # told the classes present
# task -> (data task of open_task, metric name)
TASKS: dict[str, tuple[str, str]] = {
    "fg-seg": ("fewshot", "miou"),
    "co-seg": ("coseg", "iou"),
    "sem-seg": ("semantic", "miou"),
    "ref-seg": ("referring", "miou"),
    "sem-corr": ("correspondence", "pck@0.1"),
    "temp-corr": ("video", "j&f"),
}
TEXT_TASKS = ("sem-seg", "ref-seg")  # scored against text features (no vision-encoder side)
PROMPT = "describe this image ."
TASK_PREFIX = {  # the "task" prefix: what the user would ask for
    "fg-seg": "segment the {name} .",
    "co-seg": "find the {name} in each image .",
    "sem-seg": "segment the image into : {names} .",
    "ref-seg": "find {expression} .",
    "sem-corr": "match the parts of the {name} .",
    "temp-corr": "track the objects .",
}


@dataclass
class PerceiveConfig:
    tasks: tuple[str, ...] = tuple(TASKS)
    data: dict[str, str] = field(default_factory=dict)  # task -> spec ("shapesworld:0", ...)
    n: int = 20  # items per task
    layers: tuple[int, ...] | None = None  # None = every LM layer
    sources: tuple[str, ...] = SOURCES
    prompt: str = PROMPT
    prefix: str | None = None  # None | "task" | "classes" | "classes-present" | literal text
    clusters: int = 3  # co-seg k-means clusters (object, background, other objects)
    top_k: int = 5  # temp-corr label propagation
    temperature: float = 0.1
    seed: int = 0  # k-means, and the stratified selection / held-out split of every task
    batch_size: int = 8
    sem_seg_oracle: bool = True  # also report "sem-seg-oracle" (choice among present classes)
    text_token: str = "mean"  # sem-seg / ref-seg text feature: span's "mean" or "last" token
    similarity: str = "cosine"  # text vs image tokens (sem-seg, ref-seg): "cosine" or "dot"

    def to_dict(self) -> dict:
        return asdict(self)


def check_config(config: PerceiveConfig) -> PerceiveConfig:
    """Refuse unknown tasks, text-token rules and similarities before anything runs."""
    from vislens.experiments.perception.features import TEXT_TOKENS

    check_tasks(config.tasks)
    if config.text_token not in TEXT_TOKENS:
        raise ValueError(f"unknown text token {config.text_token!r}; choose "
                         f"{' or '.join(TEXT_TOKENS)}")
    if config.similarity not in M.SIMILARITIES:
        raise ValueError(f"unknown similarity {config.similarity!r}; choose "
                         f"{' or '.join(M.SIMILARITIES)}")
    return config


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}")
    if not tasks:
        raise ValueError("no task selected; choose from " + ", ".join(TASKS))
    return tuple(dict.fromkeys(tasks))


def load_items(task: str, config: PerceiveConfig) -> list:
    spec = config.data.get(task, config.data.get("*", "shapesworld"))
    items = open_task(TASKS[task][0], spec, config.n)
    return items[:config.n]


def run(vlm: ModelHandle, config: PerceiveConfig, out, progress: Callable | None = None,
        condition: str = "clean", blocked: dict | None = None,
        items: dict[str, list] | None = None) -> dict[str, TaskEntry]:
    """Score every task item not yet in `out` (a RunDir keyed condition/task/item).

    One unit per batch of items, every task's units in one map, so that a
    vislens.runs.ray_pool.RayPool passed as `vlm` keeps all its workers busy across tasks.
    """
    vlm.require_layout("scores tokens against pixel masks and points")
    check_config(config)
    tasks = check_tasks(config.tasks)
    units = []
    for task in tasks:
        todo = items[task] if items and task in items else load_items(task, config)
        if not todo:
            raise ValueError(f"no items for {task}; check --data / --n")
        names = task_classes(task, todo)
        pending = [(i, it) for i, it in enumerate(todo)
                   if not out.done(condition=condition, task=task, item=str(i))]
        # text tasks: one image per item, so items share a batch; the others batch
        # the images of one item (an episode, a set, a pair, a video)
        step = config.batch_size if task in TEXT_TASKS else 1
        units += [(task, pending[k:k + step], names) for k in range(0, len(pending), step)]
    ex = executor(vlm)
    ex.map(_score_unit, units, config, condition, blocked, out=out, progress=progress,
           label=f"{condition} perception")
    return summarise(out.rows(), condition, tasks, ex.info.num_layers, config)


def _score_unit(vlm, out, unit, config: PerceiveConfig, condition: str, blocked) -> None:
    task, chunk, names = unit
    if task in TEXT_TASKS:
        results = score_text_items(task, vlm, [it for _, it in chunk], config, blocked, names)
    else:
        results = [SCORERS[task](vlm, chunk[0][1], config, blocked, names)]
    for (i, _), (cls, stats) in zip(chunk, results, strict=True):
        out.add({"condition": condition, "task": task, "item": str(i), "class": cls,
                 "stats": json.dumps(stats)})


# ---- per-task scoring --------------------------------------------------------------------------
def _extract(vlm, images, config, prompts=None, spans=None, prefix=None, blocked=None):
    prompts = prompts or [config.prompt] * len(images)
    return extract(vlm, images, prompts, spans=spans, layers=config.layers,
                   sources=config.sources, prefixes=[prefix] * len(images), blocked=blocked,
                   batch_size=config.batch_size)


def prefix_text(config: PerceiveConfig, task: str, classes: Sequence[str] = (),
                present: Sequence[str] = (), **fields) -> str | None:
    """The text put before the image under --prefix (None = no prefix).

    "classes" lists the task's whole class list (what a user can know before seeing
    the image); "classes-present" lists only the classes in this item, which leaks
    the answer and is reported as an oracle.
    """
    if not config.prefix:
        return None
    if config.prefix == "task":
        return TASK_PREFIX[task].format(**{k: fields.get(k, "object") for k in
                                           ("name", "names", "expression")})
    if config.prefix in ("classes", "classes-present"):
        listed = classes if config.prefix == "classes" else present
        return "classes : " + " , ".join(dict.fromkeys(listed or ["object"])) + " ."
    return config.prefix


def task_classes(task: str, items: Sequence) -> list[str]:
    """The class list of a task's data, as far as its items reach (the "classes" prefix)."""
    return sorted({n for it in items for n in item_classes(task, it)})


def item_classes(task: str, item) -> list[str]:
    """The classes one item shows (the "classes-present" oracle prefix)."""
    if task in ("fg-seg", "co-seg"):
        return [item.name]
    if task == "sem-seg":
        return list(item.present()) if item is not None else []
    if task == "ref-seg":
        return [inst.name for inst in item.sample.instances]
    if task == "sem-corr":
        return [item.category or "object"]
    return [inst.name for fr in item.frames for inst in fr.instances]


def _all_classes(task: str, item) -> list[str]:
    """sem-seg maps carry their data set's full class list; other tasks use the items'."""
    return list(item.classes[1:]) if task == "sem-seg" else []


def _labels(f: ImageFeatures, mask: np.ndarray) -> np.ndarray:
    return M.token_labels(f.coverage(mask))


def _prefix(config, task: str, item, task_names: Sequence[str], **fields) -> str | None:
    classes = list(dict.fromkeys([*task_names, *_all_classes(task, item)]))
    return prefix_text(config, task, classes=classes, present=item_classes(task, item),
                       **fields)


def _levels(pixel: dict, token: dict | None = None) -> dict:
    """A row's stats: the PIXEL-level stat of every source at the top (source -> stat, the
    layout readers of rows such as artifacts' held-out deltas expect), the token-level
    ones under "token" (absent where a task has no token level)."""
    return {**pixel, "token": token} if token is not None else dict(pixel)


def _pixel(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "token"}


def _valid(sample) -> np.ndarray | None:
    """Pixels that are scored: all but the data set's ignore pixels (VOC 255, ImageNet-S
    1000), known when the sample carries its label map (data.tasks._with_labels)."""
    labels = sample.meta.get("labels")
    if labels is None:
        return None
    return np.asarray(labels) != sample.meta.get("ignore_index", 255)


def _flat_valid(masks, valid) -> np.ndarray:
    return np.concatenate([np.ones(m.size, bool) if v is None else np.asarray(v).ravel()
                           for m, v in zip(masks, valid, strict=True)])


def score_fg_seg(vlm, ep, config, blocked, names=()):
    """Linear probe trained on the support shots' TOKEN labels; its per-token fg / bg on
    the queries is scored on the pixels (painted, uncovered pixels = background) and on
    the tokens. Chance: all-background and all-foreground predictions of the same truth."""
    images = [s.image for s in ep.support + ep.query]
    feats = _extract(vlm, images, config, blocked=blocked,
                     prefix=_prefix(config, "fg-seg", ep, names, name=ep.name))
    masks = ep.support_masks + ep.query_masks
    labels = [_labels(f, m) for f, m in zip(feats, masks, strict=True)]
    k = len(ep.support)
    queries = feats[k:]
    index = [f.pixel_index() for f in queries]
    tok_gt = np.concatenate(labels[k:])
    pix_gt = np.concatenate([np.asarray(m, bool).ravel() for m in ep.query_masks])
    pix_valid = _flat_valid(ep.query_masks, [_valid(s) for s in ep.query])
    pixel, token = {}, {}
    for src in feats[0].sources:
        pred = M.fg_seg_predict([f.sources[src] for f in feats[:k]], labels[:k],
                                [f.sources[src] for f in queries])
        token[src] = M.fg_counts(np.concatenate(pred), tok_gt)
        painted = [M.paint(ix, p, False).ravel() for ix, p in zip(index, pred, strict=True)]
        pixel[src] = M.fg_counts(np.concatenate(painted), pix_gt, pix_valid)
    for name, fill in (("all-background", False), ("all-foreground", True)):
        token[f"chance/{name}"] = M.fg_counts(np.full(tok_gt.shape, fill), tok_gt)
        pixel[f"chance/{name}"] = M.fg_counts(np.full(pix_gt.shape, fill), pix_gt, pix_valid)
    return ep.name, _levels(pixel, token)


def score_co_seg(vlm, cs, config, blocked, names=()):
    """k-means over the set's tokens; the object cluster chosen without ground truth
    ("free", metrics.coseg_free) or by its IoU ("oracle", chosen at each level), IoU pooled
    over the set's pixels (painted; uncovered = background) and over its tokens."""
    feats = _extract(vlm, [s.image for s in cs.samples], config, blocked=blocked,
                     prefix=_prefix(config, "co-seg", cs, names, name=cs.name))
    labels = [_labels(f, m) for f, m in zip(feats, cs.masks, strict=True)]
    borders = [_border(f) for f in feats]
    index = [f.pixel_index() for f in feats]
    valid = [_valid(s) for s in cs.samples]
    pixel, token = {}, {}
    for src in feats[0].sources:
        per_image, k = M.coseg_assign([f.sources[src] for f in feats], k=config.clusters,
                                      seed=config.seed)
        free = M.coseg_free(per_image, k, borders)
        tok = [_zero(M.pooled_iou([a == c for a in per_image], labels)) for c in range(k)]
        pix = [_zero(M.pooled_iou([M.paint(ix, a == c, False)
                                   for ix, a in zip(index, per_image, strict=True)],
                                  cs.masks, valid)) for c in range(k)]
        token[src] = {"free": tok[free], "oracle": max(tok)}
        pixel[src] = {"free": pix[free], "oracle": max(pix)}
    tok_all = _zero(M.pooled_iou([np.ones(len(g), bool) for g in labels], labels))
    pix_all = _zero(M.pooled_iou([np.ones(np.shape(m), bool) for m in cs.masks], cs.masks,
                                 valid))
    token["chance/all-foreground"] = {"free": tok_all, "oracle": tok_all}
    pixel["chance/all-foreground"] = {"free": pix_all, "oracle": pix_all}
    return cs.name, _levels(pixel, token)


def _zero(x: float) -> float:
    """An empty union scores 0 (co-seg's rule: a cluster that is nowhere matches nothing)."""
    return 0.0 if not np.isfinite(x) else float(x)


def _border(f: ImageFeatures) -> np.ndarray:
    """Tokens on the outer ring of their tile's grid (what the background fills)."""
    grids = f.token_map.grids[f.index]
    size = np.array([grids[int(t)] for t in f.tiles])
    return (f.rows == 0) | (f.cols == 0) | (f.rows == size[:, 0] - 1) | \
        (f.cols == size[:, 1] - 1)


def _text_request(task: str, item, config, names: Sequence[str]) -> tuple:
    """(image, prompt, spans, prefix) of one sem-seg / ref-seg item.

    sem-seg's prompt names every class of the DATA SET (item.classes: background first;
    VOC's 20, ImageNet-S's 919, ShapesWorld's shapes), never only the classes present.
    """
    if task == "sem-seg":
        words = list(item.classes)
        prompt, spans = _join_spans(words)
        return (item.sample.image, prompt, spans,
                _prefix(config, task, item, names, names=" ".join(words)))
    expr = item.expression
    return (item.sample.image, expr, [(0, len(expr))],
            _prefix(config, task, item, names, expression=expr))


def score_text_items(task: str, vlm, items: list, config, blocked, names=()
                     ) -> list[tuple[str, dict]]:
    """Score several sem-seg / ref-seg items with one batched pass."""
    reqs = [_text_request(task, it, config, names) for it in items]
    feats = extract(vlm, [r[0] for r in reqs], [r[1] for r in reqs], spans=[r[2] for r in reqs],
                    layers=config.layers, sources=config.sources, prefixes=[r[3] for r in reqs],
                    blocked=blocked, batch_size=config.batch_size, text_token=config.text_token)
    score = _sem_seg_stats if task == "sem-seg" else _ref_seg_stats
    return [score(it, f, config.similarity) for it, f in zip(items, feats, strict=True)]


def _sem_seg_stats(sm, f: ImageFeatures, similarity: str = "cosine") -> tuple[str, dict]:
    """Each token -> the class name whose text feature is most similar, among ALL the data
    set's classes ("free") or only background + the classes present (the "oracle": it is
    told which classes the image holds). Pixel level: the truth is the label map (ignore
    pixels not scored), predictions painted (uncovered pixels = background, class 0).
    Token level: a token's truth is its majority class by coverage. Chance: every pixel
    background, and a class drawn uniformly (from all classes / from the present ones)."""
    names = list(sm.classes)
    present = [0] + [names.index(n) for n in sm.present()]
    cover = np.stack([f.coverage(sm.labels == i) for i in present]
                     + [f.coverage(sm.labels == sm.ignore_index)], axis=1)
    best = cover.argmax(1)
    tok_gt = np.where(best == len(present), -1,
                      np.asarray(present)[np.minimum(best, len(present) - 1)])
    pix_gt = np.where(sm.labels == sm.ignore_index, -1, sm.labels)
    index = f.pixel_index()
    pixel, token = {}, {}
    for src, x in f.sources.items():
        if src == "vision":
            continue
        sim = M.similarity(x, np.stack([t[src].numpy() for t in f.text]), similarity)
        preds = {"free": sim.argmax(1), "oracle": np.asarray(present)[sim[:, present].argmax(1)]}
        token[src] = {w: M.semseg_stats(p, tok_gt, names) for w, p in preds.items()}
        pixel[src] = {w: M.semseg_stats(M.paint(index, p, 0), pix_gt, names)
                      for w, p in preds.items()}
    for level, gt in (("token", tok_gt), ("pixel", pix_gt)):
        every, told = M.semseg_chance(gt, names), M.semseg_chance(gt, names, among=present)
        out = token if level == "token" else pixel
        out["chance/all-background"] = {"free": every["background"],
                                        "oracle": every["background"]}
        out["chance/random-class"] = {"free": every["random"], "oracle": told["random"]}
    return ",".join(names[i] for i in present[1:]), _levels(pixel, token)


def _ref_seg_stats(ref, f: ImageFeatures, similarity: str = "cosine") -> tuple[str, dict]:
    """Mean text feature of the whole expression vs each image token: the tokens above
    Otsu's threshold ("free") or the top k, k = the target's token count ("oracle"), IoU
    with the target at pixel level (painted; uncovered = not the target) and token level.
    Chance: every pixel / token called the target."""
    cov = f.coverage(ref.mask)
    gt = M.token_labels(cov)
    if not gt.any():  # an object smaller than half a token: its best-covered token
        gt = cov >= cov.max() if cov.max() > 0 else gt
    k = int(gt.sum())
    mask = np.asarray(ref.mask, bool)
    index = f.pixel_index()
    pixel, token = {}, {}
    for src, x in f.sources.items():
        if src == "vision":
            continue
        if k == 0:
            token[src] = pixel[src] = {"free": float("nan"), "oracle": float("nan")}
            continue
        free, top = M.refseg_select(x, f.text[0][src], k, similarity)
        token[src] = {"free": M.iou(free, gt), "oracle": M.iou(top, gt)}
        pixel[src] = {"free": M.iou(M.paint(index, free, False), mask),
                      "oracle": M.iou(M.paint(index, top, False), mask)}
    tok_all, pix_all = M.iou(np.ones_like(gt), gt), M.iou(np.ones_like(mask), mask)
    token["chance/all-foreground"] = {"free": tok_all, "oracle": tok_all}
    pixel["chance/all-foreground"] = {"free": pix_all, "oracle": pix_all}
    return ref.kind, _levels(pixel, token)


def score_sem_seg(vlm, sm, config, blocked, names=()):
    return score_text_items("sem-seg", vlm, [sm], config, blocked, names)[0]


def score_ref_seg(vlm, ref, config, blocked, names=()):
    return score_text_items("ref-seg", vlm, [ref], config, blocked, names)[0]


def score_sem_corr(vlm, pair, config, blocked, names=()):
    """Nearest neighbour of each source keypoint's token among the target's tokens; the
    predicted point is that token's box centre in ORIGINAL pixels and PCK@0.1 is measured
    there (so this task is pixel level as it stands; it has no token-level variant).
    "oracle": the right token every time (the grid's cap); chance: a uniformly random
    target token for every point (in expectation)."""
    feats = _extract(vlm, [pair.source.image, pair.target.image], config, blocked=blocked,
                     prefix=_prefix(config, "sem-corr", pair, names,
                                    name=pair.category or "object"))
    src, trg = feats
    k = len(pair.source_points)
    if k == 0:
        empty = {s: [0, 0] for s in src.sources} | {"oracle": [0, 0],
                                                    "chance/random-token": [0, 0]}
        return pair.category, _levels(empty)
    tokens = src.token_at(pair.source_points)
    centres = trg.centres()
    stats = {}
    for name in src.sources:
        match = M.nearest_tokens(src.sources[name], trg.sources[name], tokens)
        stats[name] = [round(pair.pck(centres[match]) * k), k]
    stats["oracle"] = [round(pair.pck(centres[trg.token_at(pair.target_points)]) * k), k]
    hits = [pair.pck(np.repeat(c[None], k, 0)) * k for c in centres]
    stats["chance/random-token"] = [float(np.mean(hits)), k]
    return pair.category, _levels(stats)


def score_temp_corr(vlm, video, config, blocked, names=()):
    """Label propagation over the base view's tokens from frame 0's token labels; J&F on
    the frames' pixels (painted; uncovered = background; DAVIS's boundary tolerance of
    0.8% of the diagonal, a disk) and on the token grid (1 cell). "static": frame 0's
    labels copied to every frame (no tracking); chance: every pixel background."""
    feats = _extract(vlm, [fr.image for fr in video.frames], config, blocked=blocked,
                     prefix=_prefix(config, "temp-corr", video, names))
    base = [f.tiles == 0 for f in feats]
    grids, pix_gts = [], []
    for t, f in enumerate(feats):
        lab = video.label_map(t)
        pix_gts.append(lab)
        ids = [int(v) for v in np.unique(lab) if v > 0]
        cover = np.stack([f.coverage(lab == 0)] + [f.coverage(lab == i) for i in ids], 1)
        best = cover.argmax(1)
        tok = np.where(cover.max(1) >= M.COVERAGE, np.asarray([0, *ids])[best], 0)
        grids.append(_grid(f, tok, base[t]))
    index = [f.pixel_index(b) for f, b in zip(feats, base, strict=True)]
    tol = M.davis_tolerance(pix_gts[0].shape)
    pixel, token = {}, {}
    for name in feats[0].sources:
        x = [f.sources[name].numpy()[b] for f, b in zip(feats, base, strict=True)]
        first = grids[0][feats[0].rows[base[0]], feats[0].cols[base[0]]]
        preds = M.propagate(x, first, top_k=config.top_k, temperature=config.temperature)
        pred_grids = [_grid(f, p, b, full=True) for f, p, b in zip(feats, preds, base,
                                                                    strict=True)]
        token[name] = M.j_and_f(pred_grids, grids)
        pixel[name] = M.j_and_f([M.paint(ix, p, 0) for ix, p in zip(index, preds, strict=True)],
                                pix_gts, tol, disk=True)
        del x  # before the next source is read: one source of the video in memory at a time
    token["static"] = M.j_and_f([grids[0]] * len(grids), grids)  # no tracking at all
    pixel["static"] = M.j_and_f([pix_gts[0]] * len(pix_gts), pix_gts, tol, disk=True)
    token["chance/all-background"] = M.j_and_f([np.zeros_like(g) for g in grids], grids)
    pixel["chance/all-background"] = M.j_and_f([np.zeros_like(g) for g in pix_gts], pix_gts,
                                               tol, disk=True)
    return video.id, _levels(pixel, token)


def _grid(f: ImageFeatures, values: np.ndarray, keep: np.ndarray, full: bool = False
          ) -> np.ndarray:
    rows, cols = f.rows[keep], f.cols[keep]
    grid = np.zeros((rows.max() + 1, cols.max() + 1), dtype=np.int64)
    grid[rows, cols] = values if full else np.asarray(values)[keep]
    return grid


def _join_spans(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    return " ".join(words), spans


SCORERS = {"fg-seg": score_fg_seg, "co-seg": score_co_seg, "sem-seg": score_sem_seg,
           "ref-seg": score_ref_seg, "sem-corr": score_sem_corr, "temp-corr": score_temp_corr}


# ---- summary -----------------------------------------------------------------------------------
def aggregate(task: str, stats: list, classes: list[str]) -> float:
    """One source's score over the given items of a task (stats / classes per item)."""
    kept = [(s, c) for s, c in zip(stats, classes, strict=True) if s is not None]
    if not kept:
        return float("nan")
    stats, classes = [s for s, _ in kept], [c for _, c in kept]
    if task == "fg-seg":
        return M.fg_seg_score(stats, classes)
    if task == "sem-seg":
        return M.semseg_score(stats)
    if task == "sem-corr":
        total = sum(s[1] for s in stats)
        return sum(s[0] for s in stats) / total if total else float("nan")
    if task == "temp-corr":
        jf = np.asarray([s["jf"] for s in stats], dtype=float)
        return float(np.nanmean(jf)) if np.isfinite(jf).any() else float("nan")
    return float(np.nanmean(stats))  # co-seg IoU, ref-seg IoU: mean over items


def best_chance(entry: TaskEntry) -> float | None:
    """The strongest trivial predictor's score of a task's summary entry (all-background,
    all-foreground, random class, ...): the level a source must beat."""
    return max((v for v in (entry.get("chance") or {}).values() if v is not None), default=None)


def stat_variant(stat, which: str):
    """co-seg / ref-seg / sem-seg rows hold {"free", "oracle"} per source; others the stat."""
    return stat.get(which) if isinstance(stat, dict) and "free" in stat else stat


class SelectedLayer(TypedDict):
    """A source's layer chosen on the selection half, scored on the held-out half."""

    layer: int
    score: float | None
    ci95: list[float | None] | None  # bootstrap over held-out items
    n: int  # held-out items
    n_selection: int


# keys named as the sources are ("keys-pre" is no identifier), present per config.sources;
# oracle (sem-corr) / static (temp-corr) / token_level only where they apply
_TaskEntryOptional = TypedDict("_TaskEntryOptional", {
    "keys": list[float | None],  # score per LM layer (layers), held-out half
    "keys-pre": list[float | None],
    "values": list[float | None],
    "token_level": dict[str, Any],  # the same split scored per token
    "oracle": float | None,  # sem-corr: the right token every time (an upper bound)
    "static": float | None,  # temp-corr: frame 0's labels copied to every frame (a floor)
}, total=False)


class TaskEntry(_TaskEntryOptional):
    """One task (or oracle variant) of a perception summary (`summarise`): scores at pixel
    level on the held-out half of its items. Read by report/sections.py (the perception
    tables) and experiments/study.py `_headline`."""

    metric: str  # mIoU, IoU, PCK, J&F
    level: str  # "pixel"
    n: int  # items scored
    n_selection: int
    n_heldout: int
    split: dict[str, Any]  # seed, stratified_by, selection / heldout item ids
    layers: list[int]
    projector: float | None  # the LM input
    vision: float | None  # the vision encoder output
    ci95: dict[str, list[float | None] | None]  # projector / vision -> bootstrap interval
    chance: dict[str, float | None]  # trivial predictors (all-background, ...)
    selected: dict[str, SelectedLayer]  # "keys" / "values" -> held-out score
    upper_bound: dict[str, dict[str, Any]]  # best layer chosen on the held-out half itself


class PerceiveSummary(TypedDict):
    """summary.json of `vislens perceive` (what `execute` returns). Read by
    report/sections.py `perceive_section` and experiments/study.py `_headline`;
    tests/test_summary_contract.py checks both against these keys."""

    tasks: dict[str, TaskEntry]  # task (and "-oracle" variant) -> its entry
    plots: list[str]  # one curve per task


def summarise(rows: list[dict], condition: str, tasks: Sequence[str], num_layers: int,
              config: PerceiveConfig) -> dict[str, TaskEntry]:
    """Per task (and oracle variant): pixel-level scores on the held-out half, the layer
    chosen on the selection half, chance levels, item counts; the token-level scores of
    the same split under "token_level"."""
    layers = list(range(num_layers)) if config.layers is None else list(config.layers)
    kinds = [k for k in ("keys", "keys-pre", "values") if k in config.sources]
    out: dict[str, TaskEntry] = {}
    for task in tasks:
        mine = sorted((r for r in rows if r["condition"] == condition and r["task"] == task),
                      key=lambda r: int(r["item"]))
        if not mine:
            continue
        parsed = [json.loads(r["stats"]) for r in mine]
        classes = [r["class"] for r in mine]
        sel, held = selection_split(classes, config.seed)
        split = {"seed": config.seed, "stratified_by": "class",
                 "selection": [mine[i]["item"] for i in sel],
                 "heldout": [mine[i]["item"] for i in held]}
        variants = [(task, "free")]
        if task in ORACLES and (task != "sem-seg" or config.sem_seg_oracle):
            variants.append((ORACLES[task], "oracle"))
        for name, which in variants:
            entry = {"metric": TASKS[task][1], "level": "pixel", "n": len(parsed),
                     "n_selection": len(sel), "n_heldout": len(held), "split": split,
                     "layers": layers}
            entry.update(_entry(task, [_pixel(p) for p in parsed], classes, sel, held,
                                which, layers, kinds, config))
            if all("token" in p for p in parsed):
                entry["token_level"] = {"level": "token", "n_selection": len(sel),
                                        "n_heldout": len(held),
                                        **_entry(task, [p["token"] for p in parsed], classes,
                                                 sel, held, which, layers, kinds, config)}
            out[name] = cast(TaskEntry, entry)
    return out


def _entry(task, parsed, classes, sel, held, which, layers, kinds, config) -> dict:
    """One level's scores: per-layer curves, baselines and chance on the held-out half,
    the layer chosen on the selection half, 95% bootstrap intervals over held-out items."""

    def score(src: str, subset) -> float | None:
        got = [stat_variant(parsed[i].get(src), which) for i in subset]
        if all(g is None for g in got):
            return None
        return _clean(aggregate(task, got, [classes[i] for i in subset]))

    def ci(src: str, subset) -> list | None:
        pairs = [(stat_variant(parsed[i].get(src), which), classes[i]) for i in subset]
        if all(p is None for p, _ in pairs):
            return None
        lo, hi = bootstrap_metric(pairs, lambda ps: aggregate(task, [p for p, _ in ps],
                                                              [c for _, c in ps]),
                                  n_boot=200, seed=config.seed)
        return [_clean(lo), _clean(hi)]

    n = len(held)
    entry: dict = {kind: [score(f"{kind}/{ly}", held) for ly in layers] for kind in kinds}
    entry["projector"], entry["vision"] = score("projector", held), score("vision", held)
    entry["ci95"] = {src: ci(src, held) for src in ("projector", "vision")
                     if entry[src] is not None}
    chance = sorted({k for p in parsed for k in p if k.startswith("chance/")})
    entry["chance"] = {k.split("/", 1)[1]: score(k, held) for k in chance}
    entry["selected"], entry["upper_bound"] = {}, {}
    for kind in kinds:
        best = choose_layer(dict(zip(layers, entry[kind], strict=True)))
        if best is None:
            continue
        entry["upper_bound"][kind] = {"layer": best, "score": entry[kind][layers.index(best)],
                                      "n": n}
        if sel and held:  # choose on the selection half, score on the held-out half
            ly = choose_layer({ly: score(f"{kind}/{ly}", sel) for ly in layers})
            if ly is not None:
                entry["selected"][kind] = {"layer": ly, "score": score(f"{kind}/{ly}", held),
                                           "ci95": ci(f"{kind}/{ly}", held), "n": n,
                                           "n_selection": len(sel)}
    if task == "sem-corr":  # upper bound: the right token every time (token-level grid)
        entry["oracle"] = score("oracle", held)
    if task == "temp-corr":  # floor: frame 0's labels copied to every frame
        entry["static"] = score("static", held)
    return entry


def _clean(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def execute(vlm: ModelHandle, config: PerceiveConfig, out, meta: dict,
            progress: Callable | None = None
            ) -> PerceiveSummary:
    """Run into directory `out` (resuming), plot one curve per task, write summary.json."""
    from vislens.experiments.perception.plots import task_curves
    from vislens.runs.rundir import RunDir

    run_dir = RunDir(out, {"experiment": "perceive", **meta, **asdict(config)},
                     key=["condition", "task", "item"])
    tasks = run(vlm, config, run_dir, progress)
    summary: PerceiveSummary = {"tasks": tasks, "plots": [
        str(p) for p in task_curves(tasks, run_dir.path)]}
    run_dir.write_summary(summary)
    return summary
