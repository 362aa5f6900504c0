"""Liu et al. B2: input-agnostic image keys, and what blocking them does.

Stability of image-token position p in layer l: 1 - (variance of p's key across
images) / (the same variance averaged over all positions of layer l); 1 = the same
key whatever the image, ~0 = a typical position. (The plain cosine to the mean key
is not used: keys share a large common direction, so it is near 1 everywhere; nor
is the variance over all keys, which RoPE inflates with position differences.)
A key is only input-AGNOSTIC if it is stable although its input is not: plain
backgrounds (ShapesWorld's, or a sky) give stable keys because the input is stable.
So the score divides out the input's own variation, measured the same way on the
LM input at p (the projector output):

    score(p, l) = max(0, 1 - key_var_ratio(p, l) / input_var_ratio(p))

(0 = the key varies at least as much as its input, 1 = it ignores its input). Both
variances stream (per position, a sum of vectors and of squared norms), so memory
does not grow with the number of images. A position is flagged in layer l when its
score exceeds that layer's mean + z * std over positions (z = 2 by default) AND
`min_score` (default 0.9: the key keeps under a tenth of its input's variation).

Intervention: attention from every text position after the image (and generated
tokens) to the flagged keys is knocked out in the layers where they are flagged;
perception is re-measured (the text-reading tasks sem-seg / ref-seg, whose text
values change when they cannot read the artifacts; image-only tasks cannot change
because image tokens precede the text) and so is the model's multiple-choice
accuracy.

Headlines: per task, the change at one layer chosen on a selection half of the items
and measured on the other half, with a paired bootstrap interval over items
(held_out_delta; `perceive.headline`); the multiple-choice change with a paired bootstrap
interval over items, beside its item count and chance accuracy. The per-layer `delta`
curves are on all items: their largest entry is not a held-out number.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict, cast

import numpy as np
import torch
from PIL import Image

from vislens.data.resolve import open_dataset
from vislens.experiments.perception import perceive, surface
from vislens.experiments.perception.features import KeyCells, extract
from vislens.experiments.stats import choose_layer, paired_delta, selection_split
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor

TEXT_TASKS = perceive.TEXT_TASKS


@dataclass
class ArtifactsConfig:
    data: str = "shapesworld"
    n_images: int = 32  # images the scores are computed on
    z: float = 2.0
    min_score: float = 0.9
    layers: tuple[int, ...] | None = None
    prompt: str = perceive.PROMPT
    perceive: perceive.PerceiveConfig = field(
        default_factory=lambda: perceive.PerceiveConfig(tasks=TEXT_TASKS))
    mc: surface.SurfaceConfig = field(default_factory=surface.SurfaceConfig)
    batch_size: int = 8
    n_boot: int = 1000  # bootstrap draws of every headline interval

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ArtifactScores:
    scores: dict[int, np.ndarray]  # layer -> [n_positions], input-normalised
    stability: dict[int, np.ndarray]  # layer -> [n_positions], 1 - key variance ratio
    flagged: dict[int, np.ndarray]  # layer -> indices in image-token order
    rows: np.ndarray  # grid (row, col) of each position, for the plot
    cols: np.ndarray
    n_images: int
    tiles: np.ndarray  # tile of each position (0 = base view)
    grids: dict[int, tuple[int, int]]  # tile -> (rows, cols) of the scored grid

    def cells(self, layer: int) -> KeyCells:
        """The flagged keys of `layer` as image cells, to block on images of any grid."""
        idx = self.flagged[layer]
        return KeyCells(self.tiles[idx], self.rows[idx], self.cols[idx], dict(self.grids))

    def to_dict(self) -> dict:
        return {"scores": {str(k): np.round(v, 4).tolist() for k, v in self.scores.items()},
                "stability": {str(k): np.round(v, 4).tolist()
                              for k, v in self.stability.items()},
                "flagged": {str(k): v.tolist() for k, v in self.flagged.items()},
                "rows": self.rows.tolist(), "cols": self.cols.tolist(),
                "tiles": self.tiles.tolist(),
                "grids": {str(k): list(v) for k, v in self.grids.items()},
                "n_images": self.n_images}


def flag(scores: np.ndarray, z: float = 2.0, min_score: float = 0.9) -> np.ndarray:
    """Positions whose score is an outlier (> mean + z std) and high in absolute terms."""
    scores = np.asarray(scores, dtype=float)
    cut = max(scores.mean() + z * scores.std(), min_score)
    return np.flatnonzero(scores > cut)


def input_agnostic(sums: torch.Tensor, squares: torch.Tensor, n: int) -> np.ndarray:
    """1 - each position's variance across images / the mean of that over positions.

    sums: [positions, dim] sum of keys over n images; squares: [positions] sum of
    their squared norms.
    """
    mean = sums / n
    var_p = (squares / n - (mean ** 2).sum(1)).clamp_min(0)
    return (1 - var_p / var_p.mean().clamp_min(1e-12)).numpy()


def relative(key_stability: np.ndarray, input_stability: np.ndarray) -> np.ndarray:
    """1 - key variance ratio / input variance ratio, in [0, 1]: 0 = the key varies at least
    as much as its input (a key may vary more: the ratio is unbounded there, and its size
    says nothing about being input-agnostic), 1 = it ignores its input."""
    ratio = (1 - key_stability) / np.maximum(1 - input_stability, 1e-3)
    return np.clip(1 - ratio, 0.0, 1.0)


def same_size(images: list[Image.Image]) -> list[Image.Image]:
    """All images at the first one's size, so every image has the same token grid."""
    size = images[0].size
    return [im if im.size == size else im.resize(size) for im in images]


def agnostic_scores(vlm, images: list[Image.Image], config: ArtifactsConfig,
                    progress: Callable | None = None) -> ArtifactScores:
    images = same_size(images)
    sums: dict[int, torch.Tensor] = {}
    squares: dict[int, torch.Tensor] = {}
    last = None
    chunks = [images[i:i + config.batch_size] for i in range(0, len(images), config.batch_size)]
    for chunk in (progress(chunks, "artifact scores") if progress else chunks):
        feats = extract(vlm, chunk, [config.prompt] * len(chunk), layers=config.layers,
                        sources=("keys", "projector"), batch_size=config.batch_size)
        for f in feats:
            for name, k in f.sources.items():
                layer = -1 if name == "projector" else int(name.split("/")[1])
                k = k.double()
                sums[layer] = sums.get(layer, 0) + k
                squares[layer] = squares.get(layer, 0) + (k ** 2).sum(1)
            last = f
    n = len(images)
    inputs = input_agnostic(sums.pop(-1), squares.pop(-1), n)
    stability = {ly: input_agnostic(sums[ly], squares[ly], n) for ly in sorted(sums)}
    scores = {ly: relative(st, inputs) for ly, st in stability.items()}
    flagged = {ly: flag(s, config.z, config.min_score) for ly, s in scores.items()}
    return ArtifactScores(scores, stability, flagged, last.rows, last.cols, n, last.tiles,
                          dict(last.token_map.grids[last.index]))


class HeldOutChange(TypedDict):
    """A change between two conditions at one layer (`held_out_delta`): the layer chosen on
    the selection half, the change measured on the other half."""

    layer: int | None
    delta: float | None  # after - before
    ci95: list[float] | None  # paired bootstrap over items
    before: float | None
    after: float | None
    n_select: int
    n_eval: int
    selected_on: str


class _HeldOutKinds(TypedDict, total=False):
    values: HeldOutChange  # where the run scored that source
    keys: HeldOutChange


class HeldOutTask(_HeldOutKinds):
    """One task's headline (`held_out_delta`), read by report/sections.py `_headline_rows`."""

    metric: str


class MultipleChoice(TypedDict):
    """The model's multiple-choice accuracy with and without the artifacts blocked."""

    n: int  # items
    kind: str  # what the items ask (ShapesWorld attribute or the data's task)
    clean_accuracy: float | None
    knockout_accuracy: float | None
    delta: float | None  # knockout - clean
    delta_ci95: list[float] | None  # paired bootstrap over items
    chance_accuracy: float | None  # mean of 1 / choices
    answer_mode: str  # how answers were read (generated letter or answer likelihood)


class ArtifactsPerception(TypedDict):
    clean: dict[str, perceive.TaskEntry]
    knockout: dict[str, perceive.TaskEntry]  # text blocked from the flagged keys
    delta: dict[str, dict[str, Any]]  # task -> knockout - clean per layer (`delta`)
    headline: dict[str, HeldOutTask]  # task -> held-out change ({} when nothing is flagged)


class ArtifactsSummary(TypedDict):
    """summary.json of `vislens artifacts` (what `execute` returns): `run`'s keys, then
    `execute`'s (grid_plot, plots). Read by report/sections.py `artifacts_section` and
    experiments/study.py `_headline`; tests/test_summary_contract.py checks both against
    these keys. Layers are keys as strings (JSON)."""

    n_images: int  # images the scores were computed on
    z: float
    min_score: float
    flagged: dict[str, list[int]]  # layer -> flagged positions, in image-token order
    n_flagged: dict[str, int]
    score_max: dict[str, float]
    score_mean: dict[str, float]
    stability_mean: dict[str, float]
    blocked_layers: list[int]
    perceive: ArtifactsPerception
    multiple_choice: MultipleChoice
    grid_plot: str  # artifacts.png
    plots: list[str]  # clean vs knockout curves, one per task


def run(vlm: ModelHandle, config: ArtifactsConfig, out, progress: Callable | None = None
        ) -> tuple[dict, ArtifactScores]:
    images = [s.image for s in open_dataset(config.data, config.n_images)][:config.n_images]
    if len(images) < 2:
        raise ValueError("artifact scores need at least 2 images; raise --n-images")
    ex = executor(vlm)  # a vislens.runs.ray_pool.RayPool scores on one worker, then shares out
    art = ex.call(agnostic_scores, images, config, progress=progress)
    blocked = {ly: art.cells(ly) for ly, idx in art.flagged.items() if len(idx)}
    pcfg = config.perceive
    items = {t: perceive.load_items(t, pcfg) for t in pcfg.tasks}
    clean = perceive.run(vlm, pcfg, out, progress, condition="clean", items=items)
    knocked = perceive.run(vlm, pcfg, out, progress, condition="knockout", blocked=blocked,
                           items=items) if blocked else clean
    mc_items = surface.load_items(config.mc)
    size = config.batch_size  # units of whole batches: the batches model_answers makes
    chunks = [mc_items[i:i + size] for i in range(0, len(mc_items), size)]
    mc_clean = [a for part in ex.map(surface.answers, chunks, size) for a in part]
    mc_knock = [a for part in ex.map(surface.answers, chunks, size, blocked) for a in part] \
        if blocked else mc_clean
    truth = [it.answer_index for it in mc_items]

    def right(answers) -> np.ndarray:
        return np.array([a["choice"] == t for a, t in zip(answers, truth, strict=True)])

    def acc(answers):
        return round(float(np.mean(right(answers))), 4) if len(answers) else None

    ok_clean, ok_knock = right(mc_clean), right(mc_knock)
    mc_delta = paired_delta(len(mc_items), lambda idx: float(np.mean(ok_knock[idx])
                                                             - np.mean(ok_clean[idx])),
                            n_boot=config.n_boot, seed=pcfg.seed)
    headline = held_out_delta(out.rows(), "clean", "knockout", list(clean),
                              seed=pcfg.seed, n_boot=config.n_boot) if blocked else {}

    summary = {
        "n_images": art.n_images, "z": config.z, "min_score": config.min_score,
        "flagged": {str(ly): idx.tolist() for ly, idx in art.flagged.items()},
        "n_flagged": {str(ly): int(len(idx)) for ly, idx in art.flagged.items()},
        "score_max": {str(ly): round(float(s.max()), 4) for ly, s in art.scores.items()},
        "score_mean": {str(ly): round(float(s.mean()), 4) for ly, s in art.scores.items()},
        "stability_mean": {str(ly): round(float(s.mean()), 4)
                           for ly, s in art.stability.items()},
        "blocked_layers": sorted(blocked),
        "perceive": {"clean": clean, "knockout": knocked, "delta": delta(clean, knocked),
                     "headline": headline},
        "multiple_choice": {"n": len(mc_items), "kind": config.mc.kind,
                            "clean_accuracy": acc(mc_clean), "knockout_accuracy": acc(mc_knock),
                            "delta": mc_delta["delta"], "delta_ci95": mc_delta["ci95"],
                            "chance_accuracy": round(float(np.mean(
                                [1 / len(it.choices) for it in mc_items])), 4)
                            if mc_items else None,
                            "answer_mode": mc_clean[0]["mode"] if mc_clean else ""},
    }
    return summary, art


def held_out_delta(rows: list[dict], before: str, after: str, tasks: Sequence[str],
                   kinds: Sequence[str] = ("values", "keys"), seed: int = 0,
                   n_boot: int = 1000) -> dict[str, HeldOutTask]:
    """The headline change of each task (and oracle variant) between two conditions.

    The items of a task are split in two (stats.selection_split: stratified by the item's
    class, seeded); on the SELECTION half the layer of the largest change (sign kept) is
    chosen, on the other, EVALUATION half the change at that layer is measured, with a
    paired bootstrap interval over items (both conditions resampled together). The items'
    per-source statistics come from the run's rows, scored as perceive.aggregate scores
    them. -> {task: {kind: {"layer", "delta", "ci95", "before", "after", "n_select",
    "n_eval", "metric", "selected_on"}}}.
    """
    base = {v: k for k, v in perceive.ORACLES.items()}
    out: dict = {}
    for name in tasks:
        task, which = (base[name], "oracle") if name in base else (name, "free")
        mine = {c: {r["item"]: r for r in rows if r["condition"] == c and r["task"] == task}
                for c in (before, after)}
        keys = sorted(set(mine[before]) & set(mine[after]), key=int)
        if not keys:
            continue
        paired = _Paired(task, which, [mine[before][k] for k in keys],
                         [mine[after][k] for k in keys])
        entry = {kind: paired.headline(kind, seed, n_boot) for kind in kinds
                 if paired.layers(kind)}
        if entry:
            out[name] = {"metric": perceive.TASKS[task][1], **entry}
    return out


class _Paired:
    """One task's items scored under two conditions (rows of the same items, in order)."""

    def __init__(self, task: str, which: str, before: list[dict], after: list[dict]):
        self.task, self.which = task, which
        self.stats = {"before": [json.loads(r["stats"]) for r in before],
                      "after": [json.loads(r["stats"]) for r in after]}
        self.classes = [r["class"] for r in before]

    def layers(self, kind: str) -> list[int]:
        return sorted({int(s.split("/")[1]) for st in self.stats["before"] for s in st
                       if s.startswith(f"{kind}/")})

    def score(self, cond: str, src: str, idx: Sequence[int]) -> float | None:
        got = [perceive.stat_variant(self.stats[cond][i].get(src), self.which) for i in idx]
        if not idx or all(g is None for g in got):
            return None
        v = perceive.aggregate(self.task, got, [self.classes[i] for i in idx])
        return float(v) if np.isfinite(v) else None

    def change(self, src: str, idx: Sequence[int]) -> float | None:
        a, b = self.score("after", src, idx), self.score("before", src, idx)
        return None if a is None or b is None else a - b

    def headline(self, kind: str, seed: int, n_boot: int) -> HeldOutChange:
        sel, ev = selection_split(self.classes, seed)
        entry: HeldOutChange = {
            "layer": None, "delta": None, "ci95": None, "before": None, "after": None,
            "n_select": len(sel), "n_eval": len(ev),
            "selected_on": "largest |change| on the selection half"}
        if not sel or not ev:
            return entry
        layer = choose_layer({ly: self.change(f"{kind}/{ly}", sel)
                              for ly in self.layers(kind)}, by="largest-abs")
        if layer is None:
            return entry
        src = f"{kind}/{layer}"
        d = paired_delta(len(ev), lambda idx: self.change(src, [ev[i] for i in idx]),
                         n_boot=n_boot, seed=seed)
        b, a = self.score("before", src, ev), self.score("after", src, ev)
        return {**entry, "layer": layer, "delta": d["delta"], "ci95": d["ci95"],
                "before": None if b is None else round(b, 4),
                "after": None if a is None else round(a, 4)}


def delta(before: dict, after: dict) -> dict:
    """after - before per task: per-layer keys / values curves and the baselines."""
    out = {}
    for task, b in before.items():
        a = after.get(task)
        if a is None:
            continue

        def diff(x, y):
            return None if x is None or y is None else round(y - x, 4)

        out[task] = {"metric": b["metric"], "layers": b["layers"],
                     **{kind: [diff(x, y) for x, y in zip(b[kind], a[kind], strict=True)]
                        for kind in ("keys", "keys-pre", "values") if kind in b},
                     "projector": diff(b["projector"], a["projector"]),
                     "vision": diff(b["vision"], a["vision"])}
    return out


def execute(vlm: ModelHandle, config: ArtifactsConfig, out, meta: dict,
            progress: Callable | None = None
            ) -> ArtifactsSummary:
    """Run into directory `out` (resuming): scores.json, the artifact grid, clean vs
    knockout curves, summary.json."""
    from vislens.experiments.perception.plots import artifact_grid, compare_curves
    from vislens.runs.rundir import RunDir, write_json_atomic

    run_dir = RunDir(out, {"experiment": "artifacts", **meta, **asdict(config)},
                     key=["condition", "task", "item"])
    stats, art = run(vlm, config, run_dir, progress)
    summary = cast(ArtifactsSummary, stats)
    write_json_atomic(run_dir.path / "scores.json", art.to_dict())
    summary["grid_plot"] = str(artifact_grid(art, run_dir.path / "artifacts.png"))
    p = summary["perceive"]
    summary["plots"] = [str(x) for x in compare_curves(
        p["clean"], p["knockout"], run_dir.path, ("clean", "knockout"))]
    run_dir.write_summary(summary)
    return summary
