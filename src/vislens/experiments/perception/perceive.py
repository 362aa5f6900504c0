"""Liu et al. B1: zero-shot perception from image keys / values in each LM layer,
against the projector output (LM input) and the vision encoder output.

Each task item is one row (condition, task, item) holding, for every source, the
statistics its score needs (intersections and unions, matched points, ...), so a
rerun resumes and the summary is recomputed from rows. The image-only tasks use a
neutral prompt: image tokens come before the text, so their keys / values depend on
the text only through a prefix (see prefix.py).

Statistics are honest by construction: the layer reported for keys / values is
chosen on one half of the items (even indices) and scored on the other half (the
argmax over all items is reported only as a labelled upper bound); co-seg and
ref-seg choose their object without ground truth, and their ground-truth-matched
variants are reported beside them as "co-seg-oracle" / "ref-seg-oracle"; every
score carries a 95% bootstrap interval over items.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from vislens.data.resolve import open_task
from vislens.distributed import executor
from vislens.experiments.perception import metrics as M
from vislens.experiments.perception.features import SOURCES, ImageFeatures, extract
from vislens.experiments.stats import bootstrap_metric

ORACLES = {"co-seg": "co-seg-oracle", "ref-seg": "ref-seg-oracle"}  # GT-matched variants
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
    seed: int = 0
    batch_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


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


def run(vlm, config: PerceiveConfig, out, progress: Callable | None = None,
        condition: str = "clean", blocked: dict | None = None,
        items: dict[str, list] | None = None) -> dict:
    """Score every task item not yet in `out` (a RunDir keyed condition/task/item).

    One unit per batch of items, every task's units in one map, so that a
    vislens.distributed.RayPool passed as `vlm` keeps all its workers busy across tasks.
    """
    vlm.require_layout("scores tokens against pixel masks and points")
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


def score_fg_seg(vlm, ep, config, blocked, names=()):
    images = [s.image for s in ep.support + ep.query]
    feats = _extract(vlm, images, config, blocked=blocked,
                     prefix=_prefix(config, "fg-seg", ep, names, name=ep.name))
    masks = ep.support_masks + ep.query_masks
    labels = [_labels(f, m) for f, m in zip(feats, masks, strict=True)]
    k = len(ep.support)
    stats = {src: M.fg_seg_stats([f.sources[src] for f in feats[:k]], labels[:k],
                                 [f.sources[src] for f in feats[k:]], labels[k:])
             for src in feats[0].sources}
    return ep.name, stats


def score_co_seg(vlm, cs, config, blocked, names=()):
    feats = _extract(vlm, [s.image for s in cs.samples], config, blocked=blocked,
                     prefix=_prefix(config, "co-seg", cs, names, name=cs.name))
    labels = [_labels(f, m) for f, m in zip(feats, cs.masks, strict=True)]
    borders = [_border(f) for f in feats]
    stats = {src: M.coseg_iou([f.sources[src] for f in feats], labels, k=config.clusters,
                              seed=config.seed, borders=borders) for src in feats[0].sources}
    return cs.name, stats


def _border(f: ImageFeatures) -> np.ndarray:
    """Tokens on the outer ring of their tile's grid (what the background fills)."""
    grids = f.token_map.grids[f.index]
    size = np.array([grids[int(t)] for t in f.tiles])
    return (f.rows == 0) | (f.cols == 0) | (f.rows == size[:, 0] - 1) | \
        (f.cols == size[:, 1] - 1)


def _text_request(task: str, item, config, names: Sequence[str]) -> tuple:
    """(image, prompt, spans, prefix) of one sem-seg / ref-seg item."""
    if task == "sem-seg":
        words = [item.classes[0], *item.present()]
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
                    blocked=blocked, batch_size=config.batch_size)
    score = _sem_seg_stats if task == "sem-seg" else _ref_seg_stats
    return [score(it, f) for it, f in zip(items, feats, strict=True)]


def _sem_seg_stats(sm, f: ImageFeatures) -> tuple[str, dict]:
    """Each token -> the class name (background first, then the present classes) whose
    text feature is most similar; a token's truth is its majority class by coverage."""
    names = [sm.classes[0], *sm.present()]
    ids = [sm.classes.index(n) for n in names]
    cover = np.stack([f.coverage(sm.labels == i) for i in ids]
                     + [f.coverage(sm.labels == sm.ignore_index)], axis=1)
    gt = cover.argmax(1)
    gt[gt == len(ids)] = -1  # mostly ignore pixels: not scored
    stats = {}
    for src, x in f.sources.items():
        if src == "vision":
            continue
        text = np.stack([t[src].numpy() for t in f.text])
        stats[src] = M.semseg_stats(M.semseg_predict(x, text), gt, names)
    return ",".join(names[1:]), stats


def _ref_seg_stats(ref, f: ImageFeatures) -> tuple[str, dict]:
    """Mean text feature of the whole expression vs each image token (metrics.refseg_iou)."""
    cov = f.coverage(ref.mask)
    gt = M.token_labels(cov)
    if not gt.any():  # an object smaller than half a token: its best-covered token
        gt = cov >= cov.max() if cov.max() > 0 else gt
    stats = {src: M.refseg_iou(x, f.text[0][src], gt) for src, x in f.sources.items()
             if src != "vision"}
    return ref.kind, stats


def score_sem_seg(vlm, sm, config, blocked, names=()):
    return score_text_items("sem-seg", vlm, [sm], config, blocked, names)[0]


def score_ref_seg(vlm, ref, config, blocked, names=()):
    return score_text_items("ref-seg", vlm, [ref], config, blocked, names)[0]


def score_sem_corr(vlm, pair, config, blocked, names=()):
    feats = _extract(vlm, [pair.source.image, pair.target.image], config, blocked=blocked,
                     prefix=_prefix(config, "sem-corr", pair, names,
                                    name=pair.category or "object"))
    src, trg = feats
    k = len(pair.source_points)
    if k == 0:
        return pair.category, {s: [0, 0] for s in src.sources} | {"oracle": [0, 0]}
    tokens = src.token_at(pair.source_points)
    centres = trg.centres()
    stats = {}
    for name in src.sources:
        match = M.nearest_tokens(src.sources[name], trg.sources[name], tokens)
        stats[name] = [round(pair.pck(centres[match]) * k), k]
    stats["oracle"] = [round(pair.pck(centres[trg.token_at(pair.target_points)]) * k), k]
    return pair.category, stats


def score_temp_corr(vlm, video, config, blocked, names=()):
    feats = _extract(vlm, [fr.image for fr in video.frames], config, blocked=blocked,
                     prefix=_prefix(config, "temp-corr", video, names))
    base = [f.tiles == 0 for f in feats]
    grids = []
    for t, f in enumerate(feats):
        lab = video.label_map(t)
        ids = [int(v) for v in np.unique(lab) if v > 0]
        cover = np.stack([f.coverage(lab == 0)] + [f.coverage(lab == i) for i in ids], 1)
        best = cover.argmax(1)
        tok = np.where(cover.max(1) >= M.COVERAGE, np.asarray([0, *ids])[best], 0)
        grids.append(_grid(f, tok, base[t]))
    stats = {}
    for name in feats[0].sources:
        x = [f.sources[name].numpy()[b] for f, b in zip(feats, base, strict=True)]
        first = grids[0][feats[0].rows[base[0]], feats[0].cols[base[0]]]
        preds = M.propagate(x, first, top_k=config.top_k, temperature=config.temperature)
        pred_grids = [_grid(f, p, b, full=True) for f, p, b in zip(feats, preds, base,
                                                                    strict=True)]
        stats[name] = M.j_and_f(pred_grids, grids)
        del x  # before the next source is read: one source of the video in memory at a time
    stats["static"] = M.j_and_f([grids[0]] * len(grids), grids)  # no tracking at all
    return video.id, stats


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


def _variant(stat, which: str):
    """co-seg / ref-seg rows hold {"free", "oracle"} per source; others the stat itself."""
    return stat.get(which) if isinstance(stat, dict) and "free" in stat else stat


def summarise(rows: list[dict], condition: str, tasks: Sequence[str], num_layers: int,
              config: PerceiveConfig) -> dict:
    layers = list(range(num_layers)) if config.layers is None else list(config.layers)
    kinds = [k for k in ("keys", "keys-pre", "values") if k in config.sources]
    out: dict = {}
    for task in tasks:
        mine = sorted((r for r in rows if r["condition"] == condition and r["task"] == task),
                      key=lambda r: int(r["item"]))
        if not mine:
            continue
        parsed = [json.loads(r["stats"]) for r in mine]
        classes = [r["class"] for r in mine]
        index = [int(r["item"]) for r in mine]
        variants = [(task, "free")] + ([(ORACLES[task], "oracle")] if task in ORACLES else [])
        for name, which in variants:
            out[name] = _entry(task, parsed, classes, index, which, layers, kinds, config)
    return out


def _entry(task, parsed, classes, index, which, layers, kinds, config) -> dict:
    """One task's scores: curves over all items, the held-out layer choice, CIs."""
    items = list(range(len(parsed)))
    even = [i for i in items if index[i] % 2 == 0]
    odd = [i for i in items if index[i] % 2 == 1]

    def score(src: str, subset=None) -> float | None:
        subset = items if subset is None else subset
        got = [_variant(parsed[i].get(src), which) for i in subset]
        if all(g is None for g in got):
            return None
        return _clean(aggregate(task, got, [classes[i] for i in subset]))

    def ci(src: str, subset=None) -> list | None:
        subset = items if subset is None else subset
        pairs = [(_variant(parsed[i].get(src), which), classes[i]) for i in subset]
        if all(p is None for p, _ in pairs):
            return None
        lo, hi = bootstrap_metric(pairs, lambda ps: aggregate(task, [p for p, _ in ps],
                                                              [c for _, c in ps]),
                                  n_boot=200, seed=config.seed)
        return [_clean(lo), _clean(hi)]

    entry = {"metric": TASKS[task][1], "n": len(parsed), "layers": layers}
    entry.update({kind: [score(f"{kind}/{ly}") for ly in layers] for kind in kinds})
    entry["projector"], entry["vision"] = score("projector"), score("vision")
    entry["ci95"] = {src: ci(src) for src in ("projector", "vision") if entry[src] is not None}
    entry["selected"], entry["upper_bound"] = {}, {}
    for kind in kinds:
        curve = [(v, ly) for v, ly in zip(entry[kind], layers, strict=True) if v is not None]
        if not curve:
            continue
        best = max(curve, key=lambda vl: (vl[0], -vl[1]))
        entry["upper_bound"][kind] = {"layer": best[1], "score": best[0]}
        if even and odd:  # choose on the even half, score on the odd half
            chosen = [(score(f"{kind}/{ly}", even), ly) for ly in layers]
            chosen = [c for c in chosen if c[0] is not None]
            if chosen:
                ly = max(chosen, key=lambda vl: (vl[0], -vl[1]))[1]
                entry["selected"][kind] = {"layer": ly, "score": score(f"{kind}/{ly}", odd),
                                           "ci95": ci(f"{kind}/{ly}", odd), "n": len(odd)}
    if task == "sem-corr":  # upper bound: the right token every time (token-level grid)
        entry["oracle"] = score("oracle")
    if task == "temp-corr":  # floor: frame 0's labels copied to every frame
        entry["static"] = score("static")
    return entry


def _clean(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def execute(vlm, config: PerceiveConfig, out, meta: dict, progress: Callable | None = None
            ) -> dict:
    """Run into directory `out` (resuming), plot one curve per task, write summary.json."""
    from vislens.experiments.perception.plots import task_curves
    from vislens.experiments.runs import RunDir

    run_dir = RunDir(out, {"experiment": "perceive", **meta, **asdict(config)},
                     key=["condition", "task", "item"])
    summary = {"tasks": run(vlm, config, run_dir, progress)}
    summary["plots"] = [str(p) for p in task_curves(summary["tasks"], run_dir.path)]
    run_dir.write_summary(summary)
    return summary
