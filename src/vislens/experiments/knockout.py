"""Neo et al. A3: how does the answer read the image? Block attention edges in
windows of layers and measure what is left of the clean answer.

Every (condition, window) of a sample is a row of a batch: one knockout
context per window, each blocking only its own rows. Rows are grouped by
their window's first layer s, and each group resumes from the clean residual
entering layer s (recorded by the clean pass the sweep needs anyway), so
layers below s are never recomputed; the vision pass runs once per sample.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vislens.data.samples import Sample
from vislens.distributed import executor
from vislens.errors import VislensError
from vislens.experiments import funnel
from vislens.experiments.batching import extend_batch, repeat_batch
from vislens.experiments.prompts import MAX_NEW_TOKENS, answer_span, asked
from vislens.experiments.runs import RunDir
from vislens.experiments.selection import choose_targets
from vislens.experiments.stats import layer_windows, wilson_ci
from vislens.interventions import LAST, capture, knockout, resume
from vislens.report.plots import heatmap

CONDITIONS = ("object->last", "object+1->last", "object+2->last", "image-but-object+1->last",
              "object+1->last-row", "rest->last-row", "image->question")
LAYOUT_FREE = ("image->question",)  # the conditions that need image positions only
SETTINGS = ("polling", "vqa")
PAPER = {"object+1->last": {"mid-late": 0.82, "all": 0.67}, "object+1->last-row": {"all": 1.0}}


@dataclass
class KnockoutConfig:
    settings: tuple[str, ...] = SETTINGS
    conditions: tuple[str, ...] = CONDITIONS
    window: int | None = None  # layers per window (default: 10/32 of the depth)
    stride: int | None = None  # default: 5/32 of the depth
    area: tuple[float, float] | None = None
    seed: int = 0

    def validate(self) -> None:
        """Every option checked before anything is loaded or written."""
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise ValueError(f"unknown knockout setting(s) {', '.join(bad) or '(none)'}; "
                             f"choose from {', '.join(SETTINGS)}")
        unknown = set(self.conditions) - set(CONDITIONS)
        if unknown or not self.conditions:
            raise ValueError(f"unknown knockout conditions {sorted(unknown)}; choose from "
                             f"{', '.join(CONDITIONS)}")
        for name, value in (("--window", self.window), ("--stride", self.stride)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (got {value})")


def edge_sets(tm, batch, sample: int = 0, mask: np.ndarray | None = None) -> dict:
    """(queries, keys) per condition for one sample; LAST = the answer position (only the
    layout-free conditions where the family has no layout)."""
    image = tm.image_positions(sample)
    seq = batch.input_ids.shape[1]
    valid = np.flatnonzero(batch.attention_mask[sample].cpu().numpy() > 0)
    after_image = valid[valid > tm.image_end(sample)]  # markers closing the image excluded
    question_cols = after_image[after_image < seq - 1]
    if not tm.geometric:
        return {"image->question": (question_cols, image)}
    obj = tm.positions(sample, mask)
    obj1, obj2 = tm.dilate(obj, 1, sample), tm.dilate(obj, 2, sample)
    last_row = tm.last_row(sample)
    return {
        "object->last": (LAST, obj),
        "object+1->last": (LAST, obj1),
        "object+2->last": (LAST, obj2),
        "image-but-object+1->last": (LAST, np.setdiff1d(image, obj1)),
        "object+1->last-row": (last_row, np.setdiff1d(obj1, last_row)),
        "rest->last-row": (last_row, np.setdiff1d(image, np.union1d(obj1, last_row))),
        "image->question": (question_cols, image),
    }


def execute(vlm, samples: list[Sample], config: KnockoutConfig, out: Path, meta: dict,
            progress=None) -> dict:
    """Run into directory `out` (resuming), plot, and write summary.json."""
    if not vlm.spec.geometric and config.conditions == CONDITIONS:  # the default: what runs
        config = replace(config, conditions=LAYOUT_FREE)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    run_dir = RunDir(out, {"experiment": "knockout", **meta, **cfg},
                     key=["sample", "setting", "condition", "window"])
    summary = run(vlm, samples, config, run_dir, progress)
    summary["model"] = meta.get("model", "")
    rel = summary["relative_accuracy"]
    summary["plot"] = str(heatmap(
        [[v if v is not None else float("nan") for v in rel[c]] for c in rel], list(rel),
        summary["window_labels"], run_dir.path / "knockout.png",
        f"Attention knockout ({summary['model']}): relative accuracy", "relative accuracy",
        0, 1))
    run_dir.write_summary(summary)
    return summary


def run(vlm, samples: list[Sample], config: KnockoutConfig, out: RunDir, progress=None) -> dict:
    if not samples:
        raise ValueError("no samples for knockout; check --data / --n")
    config.validate()
    bad = [c for c in config.conditions if c not in LAYOUT_FREE]
    if not vlm.spec.geometric and bad:
        raise VislensError(f"knockout conditions {', '.join(bad)} map the object's mask to "
                           f"image tokens, which needs a token layout; vislens has none for "
                           f"{vlm.spec.model_type!r}: run --conditions "
                           f"{','.join(LAYOUT_FREE)} or add a family module")
    ex = executor(vlm)  # this process, or a vislens.distributed.RayPool: one unit per sample
    layers = ex.info.num_layers
    windows = layer_windows(layers, config.window, config.stride)
    windows.append((0, layers - 1))  # "all"
    rng = np.random.default_rng(config.seed)
    targets = choose_targets(samples, config.area, rng)
    items = [(s, t) for s, t in zip(samples, targets) if t is not None
             and not all(out.done(sample=s.id, setting=setting, condition="clean", window=-1)
                         for setting in config.settings)]
    ex.map(_unit, items, config, windows, out=out, progress=progress, label="knockout")
    rows = out.rows()
    summary = summarise(rows, config, windows)
    summary["funnel"] = funnel.tally(samples, targets, rows, config.settings)
    return summary


def _unit(vlm, out: RunDir, item: tuple[Sample, int], config: KnockoutConfig, windows) -> None:
    """Every setting of one sample not yet in `out`."""
    sample, target = item
    for setting in config.settings:
        if not out.done(sample=sample.id, setting=setting, condition="clean", window=-1):
            for row in _sample_rows(vlm, sample, target, setting, config, windows):
                out.add(row)


@torch.no_grad()
def _sample_rows(vlm, sample, target, setting, config: KnockoutConfig, windows):
    """Clean answer first; then, teacher-forcing its tokens, every (condition, window).

    A condition keeps the answer when greedy decoding would still produce every token
    of it up to the end of the answer word (so "gir|affe" counts both pieces), i.e.
    when each teacher-forced position's argmax is the clean token; p_answer is the
    probability of that token sequence.
    """
    q = asked(vlm, sample, target, setting)
    if q is None:  # VQA: the region word would not single out the target (funnel step)
        yield {"sample": sample.id, "setting": setting,
               "target": sample.instances[target].name, "answer": "", "condition": "clean",
               "window": -1, "start": 0, "end": vlm.num_layers - 1, "p_answer": 0.0,
               "correct": False, "kept": False, "p_clean": 0.0, "n_answer_tokens": 0,
               "skipped": funnel.SKIPPED_REGION}
        return
    one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
    feats = vlm.image_embeddings(one)
    generated = vlm.trim(vlm.generate(one, max_new_tokens=MAX_NEW_TOKENS[setting],
                                      image_features=feats)[0])
    span = answer_span(lambda ids: vlm.decode(torch.tensor([ids]))[0], generated, q)
    base = {"sample": sample.id, "setting": setting, "target": sample.instances[target].name,
            "answer": vlm.decode(torch.tensor([generated]))[0]}
    if span is None:
        yield {**base, "condition": "clean", "window": -1, "start": 0,
               "end": vlm.num_layers - 1, "p_answer": 0.0, "correct": False, "kept": False,
               "p_clean": 0.0, "n_answer_tokens": 0}
        return
    answer = torch.tensor(generated[:span[1]], dtype=torch.long)
    keep = len(answer)
    ext = extend_batch(one, answer[:-1])
    probs, cached = clean_pass(vlm, ext, feats, [s for s, _ in windows], keep=keep)
    p_clean = float(_sequence_prob(probs[0], answer))
    base["n_answer_tokens"] = keep
    yield {**base, "condition": "clean", "window": -1, "start": 0, "end": vlm.num_layers - 1,
           "p_answer": p_clean, "correct": True, "kept": True, "p_clean": p_clean}
    queries = np.arange(ext.seq_len - keep, ext.seq_len)  # the answer's positions
    edges = {c: (queries if isinstance(qs, str) else qs, ks) for c, (qs, ks) in
             edge_sets(one.token_map, one, 0, sample.instances[target].mask).items()}
    grid = [(c, w) for c in config.conditions for w in range(len(windows))]
    after = sweep(vlm, ext, feats, edges, grid, windows, cached, keep=keep)
    target_ids = answer.to(after.device)
    for i, (c, w) in enumerate(grid):
        kept = bool((after[i].argmax(-1) == target_ids).all())
        yield {**base, "condition": c, "window": w, "start": windows[w][0], "end": windows[w][1],
               "p_answer": float(_sequence_prob(after[i], answer)), "correct": kept,
               "kept": True, "p_clean": p_clean}


def _sequence_prob(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p(tokens) from per-position distributions [len(tokens), vocab]."""
    return probs[torch.arange(len(tokens)), tokens.to(probs.device)].prod()


@torch.no_grad()
def clean_pass(vlm, one, feats, starts, keep: int = 1
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Clean next-token distributions of the last `keep` positions [B, keep, vocab], and the
    residual [B, S, hidden] entering each layer in `starts` (what a window resumes from)."""
    starts = sorted({int(s) for s in starts})
    cols = [np.arange(one.seq_len)] * one.size
    with capture(vlm, cols, layers=starts) as cap:
        logits = vlm.forward(one, image_features=feats, logits_to_keep=keep).logits
    cached = {s: cap.residual[s].view(one.size, one.seq_len, -1) for s in starts}
    return torch.softmax(logits.float(), -1), cached


@torch.no_grad()
def sweep(vlm, one, feats, edges: dict, grid: list[tuple[str, int]], windows,
          cached: dict[int, torch.Tensor], keep: int = 1) -> torch.Tensor:
    """Next-token distributions [len(grid), keep, vocab] of every (condition, window) of a
    one-sample batch: one forward per distinct window start, each from the cached clean
    residual."""
    empty = (LAST, np.zeros(0, dtype=np.int64))
    out = None
    for start in sorted({windows[w][0] for _, w in grid}):
        idx = [i for i, (_, w) in enumerate(grid) if windows[w][0] == start]
        group = [grid[i] for i in idx]
        rows = repeat_batch(one, len(group))
        with ExitStack() as stack:
            if start > 0:
                hidden = cached[start].expand(len(group), -1, -1)
                stack.enter_context(resume(vlm, start, hidden))
            for w in sorted({w for _, w in group}):
                per_row = [edges[c] if wi == w else empty for c, wi in group]
                stack.enter_context(knockout(vlm, per_row, range(windows[w][0],
                                                                 windows[w][1] + 1)))
            logits = vlm.forward(rows, image_features=feats * len(group),
                                 logits_to_keep=keep).logits
        probs = torch.softmax(logits.float(), -1)
        if out is None:
            out = probs.new_empty(len(grid), *probs.shape[1:])
        out[torch.as_tensor(idx, device=out.device)] = probs
    return out


def summarise(rows: list[dict], config: KnockoutConfig, windows) -> dict:
    """Relative accuracy (share of clean-correct answers kept) and mean change in p(answer)."""
    ko = [r for r in rows if r["condition"] != "clean"]
    rel, dp, by_setting, ci95 = {}, {}, {}, {}
    for c in config.conditions:
        rel[c], dp[c], ci95[c] = [], [], []
        for w in range(len(windows)):
            sel = [r for r in ko if r["condition"] == c and r["window"] == w]
            rel[c].append(float(np.mean([r["correct"] for r in sel])) if sel else None)
            ci95[c].append(list(wilson_ci(sum(r["correct"] for r in sel), len(sel)))
                           if sel else None)
            dp[c].append(float(np.mean([r["p_answer"] - r["p_clean"] for r in sel]))
                         if sel else None)
    for s in config.settings:
        by_setting[s] = {c: [float(np.mean(v)) if (v := [r["correct"] for r in ko
                                                         if r["setting"] == s
                                                         and r["condition"] == c
                                                         and r["window"] == w]) else None
                             for w in range(len(windows))] for c in config.conditions}
    clean = [r for r in rows if r["condition"] == "clean"]
    return {
        "windows": [list(w) for w in windows],
        "window_labels": [f"{s}-{e}" for s, e in windows[:-1]] + ["all"],
        "relative_accuracy": rel,
        "ci95": ci95,
        "prob_change": dp,
        "relative_accuracy_by_setting": by_setting,
        "n_kept": {s: sum(r["kept"] for r in clean if r["setting"] == s) for s in config.settings},
        "paper": PAPER,
        "config": asdict(config),
    }
