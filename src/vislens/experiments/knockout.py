"""Neo et al. A3: how does the answer read the image? Block attention edges in
windows of layers and measure what is left of the clean answer.

Conditions (query group <- key group) are Neo et al.'s six, each built as
scripts/attention_experiment_curate.py builds it (block list = every (query, key)
pair of its "to" x "from" lists, :34-36), plus image -> question (a vislens extra):
  object->last                 O -> last position                        (:202-205)
  object+1->last               O+1 -> last                               (:212-216)
  object+2->last               O+2 -> last                               (:222-226)
  image-but-object+1->last     image minus O+1 -> last                   (:151, :172-176)
  object+1->last-row           O+1 -> last image row; where O+1 reaches into that row,
                               those last-row tokens are blocked from each other too
                               (keys = all of O+1)                        (:162-166, :292-296)
  image-but-last-row->last-row every image token above the last row, O included
                                                                          (:312-316)
  image->question              image -> the question's word tokens (no template token,
                               no answer prefix)
"rest->last-row" (image minus O+1 minus the last row -> last row) stays available by
name; it is no condition of the paper's.

Windows (`KnockoutConfig.windows`, parsed by `knockout_windows`): "neo" = the released
code's 0-9, 5-14, 11-20, 15-24, 21-31 (:153-159) on 32 layers, scaled to other depths,
plus all layers; "A-B" and "all" items; "sliding:K" = a K-layer window centred on
every layer.

Correctness, both kept per row and summarised: `correct` (vislens) = greedy decoding
under the knockout still gives every clean answer token up to the end of the answer
word; `first_correct` (Neo et al.: one forward, the argmax at the last position,
:47-57) = the argmax where the answer word starts is still its clean first token.

Every (condition, window) of a sample is a row of a batch: one knockout
context per window, each blocking only its own rows. A knockout in window [a, b]
whose first blocked query is p changes nothing below layer a and nothing before
position p (no position attends to a later one), so rows are grouped by (a, p) and
each group runs positions p.. of layers a..L on the clean pass's keys and values
(interventions.continuation): a "-> last" condition recomputes the answer rows alone.
The clean answer is decoded from the recorded prompt, and the vision pass runs once per
sample. Families whose positions see later ones recompute every position from layer a.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import torch

from vislens.data.samples import Sample
from vislens.experiments import funnel
from vislens.experiments.batching import extend_batch, repeat_batch
from vislens.experiments.decoding import greedy, plain_greedy
from vislens.experiments.funnel import Funnel
from vislens.experiments.prompts import MAX_NEW_TOKENS, answer_span, asked
from vislens.experiments.selection import choose_targets
from vislens.experiments.stats import layer_windows, wilson_ci
from vislens.interventions import LAST, knockout, start_at_layer
from vislens.interventions.continuation import Recorded, advance, extend, record, refused
from vislens.models.tokenmap import options_need_layout
from vislens.render.plots import heatmap
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor
from vislens.runs.rundir import RunDir

NEO_CONDITIONS = ("object->last", "object+1->last", "object+2->last",
                  "image-but-object+1->last", "object+1->last-row",
                  "image-but-last-row->last-row")
CONDITIONS = (*NEO_CONDITIONS, "image->question")  # what runs by default
EXTRA_CONDITIONS = ("rest->last-row",)  # by name only
LAYOUT_FREE = ("image->question",)  # the conditions that need image positions only
SETTINGS = ("polling", "vqa")
PAPER = {"object+1->last": {"mid-late": 0.82, "all": 0.67}, "object+1->last-row": {"all": 1.0}}
# Neo et al.'s windows on LLaVA-1.5's 32 layers (attention_experiment_curate.py:153-159)
NEO_DEPTH = 32
NEO_WINDOWS = ((0, 9), (5, 14), (11, 20), (15, 24), (21, 31))
METRICS = {
    "relative_accuracy": "every answer token kept: greedy decoding under the knockout still "
                         "gives each clean answer token up to the end of the answer word "
                         "(vislens)",
    "relative_accuracy_first_token": "first token kept: the argmax where the answer word "
                                     "starts is still its clean first token (Neo et al.)",
}


def _round(x: float) -> int:
    """Half up (Python's round() goes to even: 0.5 -> 0 but 1.5 -> 2)."""
    return int(np.floor(x + 0.5))


def scale_window(start: int, end: int, n_layers: int, depth: int = NEO_DEPTH
                 ) -> tuple[int, int]:
    """A window [start, end] of a `depth`-layer model on an `n_layers` one: its bounds as
    layer boundaries, start -> round(start * L / depth), end + 1 -> round((end + 1) * L /
    depth), rounded half up; never empty, never past the last layer."""
    a = min(_round(start * n_layers / depth), n_layers - 1)
    b = min(max(_round((end + 1) * n_layers / depth) - 1, a), n_layers - 1)
    return a, b


def _window_items(spec: str) -> list[str]:
    items = [x.strip().lower() for x in str(spec).split(",") if x.strip()]
    if not items:
        raise ValueError("--windows is empty; give e.g. neo, 0-9,11-20,all or sliding:3")
    for item in items:
        if item in ("neo", "all"):
            continue
        if item.startswith("sliding:"):
            k = item.partition(":")[2]
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"--windows {item!r}: sliding:K needs a whole K >= 1")
            continue
        a, sep, b = item.partition("-")
        if not (sep and a.isdigit() and b.isdigit()) or int(a) > int(b):
            raise ValueError(f"--windows item {item!r} is none of neo, all, sliding:K or "
                             "FIRST-LAST (0-based, inclusive, FIRST <= LAST)")
    return items


def knockout_windows(n_layers: int, spec: str = "neo") -> list[tuple[int, int]]:
    """Inclusive [first, last] layer windows from a comma list of items, in order, each
    window once:
      neo        Neo et al.'s 0-9, 5-14, 11-20, 15-24, 21-31 (exactly, on 32 layers; other
                 depths scale them with `scale_window`) and then all layers;
      all        every layer;
      A-B        layers A..B;
      sliding:K  for every layer l, the K-layer window centred on l
                 ([l - (K-1)//2, l + K//2], cut at the first and last layer).
    """
    if n_layers < 1:
        raise ValueError(f"a model needs at least one layer, got {n_layers}")
    out: list[tuple[int, int]] = []
    for item in _window_items(spec):
        if item == "neo":
            got = [scale_window(s, e, n_layers) for s, e in NEO_WINDOWS] + [(0, n_layers - 1)]
        elif item == "all":
            got = [(0, n_layers - 1)]
        elif item.startswith("sliding:"):
            k = int(item.partition(":")[2])
            got = [(max(0, c - (k - 1) // 2), min(n_layers - 1, c + k // 2))
                   for c in range(n_layers)]
        else:
            a, _, b = item.partition("-")
            if int(b) >= n_layers:
                raise ValueError(f"--windows {item}: this model has layers 0..{n_layers - 1}")
            got = [(int(a), int(b))]
        for w in got:
            if w not in out:
                out.append(w)
    return out


def window_label(window, n_layers: int) -> str:
    s, e = window
    return "all" if (s, e) == (0, n_layers - 1) else f"{s}-{e}"


@dataclass
class KnockoutConfig:
    settings: tuple[str, ...] = SETTINGS
    conditions: tuple[str, ...] = CONDITIONS
    windows: str = "neo"  # see knockout_windows: "neo", "0-9,11-20,all", "sliding:3"
    window: int | None = None  # given: evenly strided windows of this size instead (+ all)
    stride: int | None = None  # their stride (default: half the size, at least 1)
    area: tuple[float, float] | None = None
    seed: int = 0

    def validate(self) -> None:
        """Every option checked before anything is loaded or written."""
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise ValueError(f"unknown knockout setting(s) {', '.join(bad) or '(none)'}; "
                             f"choose from {', '.join(SETTINGS)}")
        unknown = set(self.conditions) - set(CONDITIONS) - set(EXTRA_CONDITIONS)
        if unknown or not self.conditions:
            raise ValueError(f"unknown knockout conditions {sorted(unknown)}; choose from "
                             f"{', '.join(CONDITIONS + EXTRA_CONDITIONS)}")
        for name, value in (("--window", self.window), ("--stride", self.stride)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (got {value})")
        _window_items(self.windows)

    def layer_windows(self, n_layers: int) -> list[tuple[int, int]]:
        """The windows this config runs on an n_layers model, "all" included."""
        if self.window is None and self.stride is None:
            return knockout_windows(n_layers, self.windows)
        size = self.window or max(1, round(n_layers * 10 / 32))
        out = layer_windows(n_layers, size, self.stride or max(1, size // 2))
        return out + [w for w in [(0, n_layers - 1)] if w not in out]


def _after_image(tm, batch, sample: int) -> np.ndarray:
    valid = np.flatnonzero(batch.attention_mask[sample].cpu().numpy() > 0)
    return valid[valid > tm.image_end(sample)]  # markers closing the image excluded


def question_columns(tokenizer, batch, sample: int, question: str) -> np.ndarray:
    """Columns after the image of the tokens that spell the question's WORDS: a token is
    kept when the characters it decodes to overlap the question's text and hold a letter
    or digit. Chat-template tokens, the answer prefix ("It is") and a "?" standing alone
    are not. Found on the decoded text, whitespace ignored, so any tokenizer works."""
    tm = batch.token_map
    cols = _after_image(tm, batch, sample)
    ids = batch.input_ids[sample, torch.as_tensor(cols, device=batch.input_ids.device)].tolist()
    text, spans = "", []
    for j in range(1, len(ids) + 1):  # token j-1 adds text[lo:hi] to the decoded prefix
        now = tokenizer.decode(ids[:j], skip_special_tokens=False)
        lo = len(os.path.commonprefix([text, now]))
        spans.append((lo, len(now)))
        text = now
    keep = [i for i, ch in enumerate(text) if not ch.isspace()]  # squeezed -> text index
    squeezed = "".join(text[i] for i in keep)
    wanted = "".join(question.split())
    at = squeezed.find(wanted)
    if not wanted or at < 0:
        raise ValueError(f"the question {question!r} is not among the tokens after the image "
                         f"({text!r}); cannot tell its words from the template")
    lo_q, hi_q = keep[at], keep[at + len(wanted) - 1] + 1
    out = [c for c, (lo, hi) in zip(cols, spans, strict=True)
           if any(ch.isalnum() for ch in text[max(lo, lo_q):min(hi, hi_q)])]
    return np.asarray(out, dtype=np.int64)


def edge_sets(tm, batch, sample: int = 0, mask: np.ndarray | None = None,
              question_cols: np.ndarray | None = None) -> dict:
    """(queries, keys) per condition for one sample; LAST = the answer position (only the
    layout-free conditions where the family has no layout).

    question_cols: the question's word tokens (`question_columns`); without them,
    image->question takes every text token after the image but the last.
    """
    image = tm.image_positions(sample)
    if question_cols is None:
        after_image = _after_image(tm, batch, sample)
        question_cols = after_image[after_image < batch.input_ids.shape[1] - 1]
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
        # keys: all of O+1, its last-row tokens too (as released): there they are also
        # blocked from each other (a key after its query is causal-masked anyway)
        "object+1->last-row": (last_row, obj1),
        "image-but-last-row->last-row": (last_row, np.setdiff1d(image, last_row)),
        "rest->last-row": (last_row, np.setdiff1d(image, np.union1d(obj1, last_row))),
        "image->question": (question_cols, image),
    }


def execute(vlm: ModelHandle, samples: list[Sample], config: KnockoutConfig, out: Path, meta: dict,
            progress=None) -> KnockoutSummary:
    """Run into directory `out` (resuming), plot, and write summary.json."""
    if not vlm.family.geometric and config.conditions == CONDITIONS:  # the default: what runs
        config = replace(config, conditions=LAYOUT_FREE)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    run_dir = RunDir(out, {"experiment": "knockout", **meta, **cfg},
                     key=["sample", "setting", "condition", "window"])
    summary = cast(KnockoutSummary, run(vlm, samples, config, run_dir, progress))
    summary["model"] = meta.get("model", "")
    for key, name, what in (("relative_accuracy", "knockout.png", "every answer token"),
                            ("relative_accuracy_first_token", "knockout_first_token.png",
                             "first token (Neo et al.)")):
        rel = summary[key]
        summary["plot" if key == "relative_accuracy" else "plot_first_token"] = str(heatmap(
            [[v if v is not None else float("nan") for v in rel[c]] for c in rel], list(rel),
            summary["window_labels"], run_dir.path / name,
            f"Attention knockout ({summary['model']}): relative accuracy, {what}",
            "relative accuracy", 0, 1))
    run_dir.write_summary(summary)
    return summary


def run(vlm: ModelHandle, samples: list[Sample], config: KnockoutConfig, out: RunDir,
        progress=None) -> dict:
    if not samples:
        raise ValueError("no samples for knockout; check --data / --n")
    config.validate()
    bad = [c for c in config.conditions if c not in LAYOUT_FREE]
    if not vlm.family.geometric and bad:
        raise options_need_layout(vlm.family.model_type, f"knockout conditions {', '.join(bad)}",
                                  f"run --conditions {','.join(LAYOUT_FREE)}")
    ex = executor(vlm)  # this process, or a vislens.runs.ray_pool.RayPool: one unit per sample
    windows = config.layer_windows(ex.info.num_layers)
    targets = choose_targets(samples, config.area)
    items = [(s, t) for s, t in zip(samples, targets) if t is not None
             and not all(out.done(sample=s.id, setting=setting, condition="clean", window=-1)
                         for setting in config.settings)]
    ex.map(_unit, items, config, windows, out=out, progress=progress, label="knockout")
    rows = out.rows()
    summary = summarise(rows, config, windows, ex.info.num_layers)
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
def _not_kept(base: dict, n_layers: int, **extra) -> dict:
    """The clean row of a sample the sweep skips: no unambiguous question, or answered wrong."""
    return {**base, "condition": "clean", "window": -1, "start": 0, "end": n_layers - 1,
            "p_answer": 0.0, "correct": False, "kept": False, "p_clean": 0.0,
            "n_answer_tokens": 0, "first_correct": False, "p_first": 0.0, "p_first_clean": 0.0,
            **extra}


def _sample_rows(vlm, sample, target, setting, config: KnockoutConfig, windows):
    """Clean answer first; then, teacher-forcing its tokens, every (condition, window).

    A condition keeps the answer (`correct`) when greedy decoding would still produce
    every token of it up to the end of the answer word (so "gir|affe" counts both
    pieces), i.e. when each teacher-forced position's argmax is the clean token;
    p_answer is the probability of that token sequence. `first_correct` (Neo et al.'s
    rule) looks at one position only, where the answer word starts ("gir"; with Neo's
    prefix "It is a" the first answer position): its argmax is still the clean token;
    p_first is that token's probability.
    """
    q = asked(vlm, sample, target, setting)
    base = {"sample": sample.id, "setting": setting, "target": sample.instances[target].name}
    if q is None:  # VQA: the region word would not single out the target (funnel step)
        yield _not_kept({**base, "answer": ""}, vlm.num_layers, skipped=funnel.SKIPPED_REGION)
        return
    one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
    feats = vlm.image_embeddings(one)
    starts = [s for s, _ in windows]
    prompt = None if refused(vlm) else record(vlm, one, feats, residual_layers=starts)
    if prompt is not None and prompt.reusable and not plain_greedy(vlm):
        # the clean answer continues the recorded prompt (it is not run twice)
        tokens = greedy(vlm, prompt.rows(1, one.seq_len), prompt.logits[:, -1],
                        MAX_NEW_TOKENS[setting])[0]
        generated = vlm.trim(torch.tensor(tokens, dtype=torch.long))
    else:
        generated = vlm.trim(vlm.generate(one, max_new_tokens=MAX_NEW_TOKENS[setting],
                                          image_features=feats)[0])
    span = answer_span(lambda ids: vlm.decode(torch.tensor([ids]))[0], generated, q)
    base["answer"] = vlm.decode(torch.tensor([generated]))[0]
    if span is None:
        yield _not_kept(base, vlm.num_layers)
        return
    answer = torch.tensor(generated[:span[1]], dtype=torch.long)
    keep, first = len(answer), span[0]  # first: where the answer word starts
    ext = extend_batch(one, answer[:-1])
    if prompt is not None and prompt.reusable:  # the answer teacher-forced after the prompt
        recorded = extend(vlm, prompt, answer[:-1], residual_layers=starts, keep=keep)
        probs = torch.softmax(recorded.logits.float(), -1)
    else:
        probs, recorded = clean_pass(vlm, ext, feats, starts, keep=keep)
    p_clean = float(_sequence_prob(probs[0], answer))
    p_first_clean = float(probs[0, first, int(answer[first])])
    base["n_answer_tokens"] = keep
    yield {**base, "condition": "clean", "window": -1, "start": 0, "end": vlm.num_layers - 1,
           "p_answer": p_clean, "correct": True, "kept": True, "p_clean": p_clean,
           "first_correct": True, "p_first": p_first_clean, "p_first_clean": p_first_clean}
    queries = np.arange(ext.seq_len - keep, ext.seq_len)  # the answer's positions
    words = question_columns(vlm.tokenizer, one, 0, q.prompt)
    edges = {c: (queries if isinstance(qs, str) else qs, ks) for c, (qs, ks) in
             edge_sets(one.token_map, one, 0, sample.instances[target].mask, words).items()}
    grid = [(c, w) for c in config.conditions for w in range(len(windows))]
    after = sweep(vlm, ext, feats, edges, grid, windows, recorded, keep=keep)
    target_ids = answer.to(after.device)
    for i, (c, w) in enumerate(grid):
        top = after[i].argmax(-1)
        yield {**base, "condition": c, "window": w, "start": windows[w][0], "end": windows[w][1],
               "p_answer": float(_sequence_prob(after[i], answer)),
               "correct": bool((top == target_ids).all()), "kept": True, "p_clean": p_clean,
               "first_correct": bool(top[first] == target_ids[first]),
               "p_first": float(after[i, first, int(answer[first])]),
               "p_first_clean": p_first_clean}


def _sequence_prob(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p(tokens) from per-position distributions [len(tokens), vocab]."""
    return probs[torch.arange(len(tokens)), tokens.to(probs.device)].prod()


@torch.no_grad()
def clean_pass(vlm, one, feats, starts, keep: int = 1) -> tuple[torch.Tensor, Recorded]:
    """Clean next-token distributions of the last `keep` positions [B, keep, vocab], and the
    pass recorded for reuse: every layer's keys and values, and the residual [B, S, hidden]
    entering each layer in `starts` (where a window starts)."""
    recorded = record(vlm, one, feats, residual_layers=starts, keep=keep)
    return torch.softmax(recorded.logits.float(), -1), recorded


def first_changed(queries, seq_len: int) -> int:
    """The first position a knockout with these query columns changes, in any layer: its
    first blocked query, where no position attends to a later one ("last": the last)."""
    if isinstance(queries, str):
        return seq_len - 1
    cols = np.asarray(queries, dtype=np.int64)
    return int(cols.min()) if cols.size else seq_len


@torch.no_grad()
def sweep(vlm, one, feats, edges: dict, grid: list[tuple[str, int]], windows,
          recorded: Recorded, keep: int = 1) -> torch.Tensor:
    """Next-token distributions [len(grid), keep, vocab] of every (condition, window) of a
    one-sample batch. Rows are grouped by (window start a, first changed position p): each
    group runs positions p.. of layers a..L only, from the clean residual entering layer a
    and the clean keys and values of positions before p. Where the recorded pass cannot be
    continued (a family whose positions see later ones), p is 0 and each group resumes
    from the clean residual entering its layer a."""
    empty = (LAST, np.zeros(0, dtype=np.int64))
    seq = one.seq_len
    first = {c: first_changed(edges[c][0], seq) if recorded.reusable else 0
             for c in {c for c, _ in grid}}
    out = None
    for start, p in sorted({(windows[w][0], min(first[c], seq - keep)) for c, w in grid}):
        idx = [i for i, (c, w) in enumerate(grid)
               if windows[w][0] == start and min(first[c], seq - keep) == p]
        group = [grid[i] for i in idx]
        n = len(group)
        with ExitStack() as stack:
            for w in sorted({w for _, w in group}):
                per_row = [edges[c] if wi == w else empty for c, wi in group]
                stack.enter_context(knockout(vlm, per_row, range(windows[w][0],
                                                                 windows[w][1] + 1),
                                             seq_len=seq))
            if recorded.reusable:
                source = recorded.embeds if start == 0 else recorded.residual[start]
                logits = advance(vlm, recorded.rows(n, p), source[:, p:].expand(n, -1, -1),
                                 **recorded.after(p), layer=start, keep=keep)
            else:
                if start > 0:
                    hidden = recorded.residual[start].expand(n, -1, -1)
                    stack.enter_context(start_at_layer(vlm, start, hidden))
                logits = vlm.forward(repeat_batch(one, n), image_features=feats * n,
                                     logits_to_keep=keep).logits
        probs = torch.softmax(logits.float(), -1)
        if out is None:
            out = probs.new_empty(len(grid), *probs.shape[1:])
        out[torch.as_tensor(idx, device=out.device)] = probs
    return out


class KnockoutSummary(TypedDict):
    """summary.json of `vislens knockout` (what `execute` returns): `summarise`'s keys, then
    `run`'s (funnel) and `execute`'s (model, plot, plot_first_token). Read by
    report/sections.py `knockout_section` and experiments/study.py `_headline`;
    tests/test_summary_contract.py checks both against these keys. A cell is one
    (condition, window): lists run over `windows`, None where no row was kept."""

    windows: list[list[int]]  # [first, last] layer of each window
    window_labels: list[str]  # "0-9", ..., "all"
    metrics: dict[str, str]  # METRICS: what each relative accuracy counts
    relative_accuracy: dict[str, list[float | None]]  # condition -> per window (vislens rule)
    ci95: dict[str, list[list[float] | None]]
    relative_accuracy_first_token: dict[str, list[float | None]]  # Neo et al.'s rule
    ci95_first_token: dict[str, list[list[float] | None]]
    prob_change: dict[str, list[float | None]]  # mean change in p(answer)
    prob_change_first_token: dict[str, list[float | None]]
    relative_accuracy_by_setting: dict[str, dict[str, list[float | None]]]
    relative_accuracy_first_token_by_setting: dict[str, dict[str, list[float | None]]]
    n_kept: dict[str, int]  # setting -> samples answered right clean
    paper: dict[str, dict[str, float]]  # PAPER
    config: dict[str, Any]
    funnel: Funnel
    model: str
    plot: str  # knockout.png
    plot_first_token: str  # knockout_first_token.png


def summarise(rows: list[dict], config: KnockoutConfig, windows, n_layers: int | None = None
              ) -> dict:
    """Relative accuracy (share of clean-correct answers kept) by both rules (METRICS), and
    mean change in p(answer) / p(first answer-word token)."""
    ko = [r for r in rows if r["condition"] != "clean"]
    if n_layers is None:  # the widest window's end: right whenever "all" is one of them
        n_layers = max(e for _, e in windows) + 1 if windows else 0

    def cells(key: str, value, setting: str | None = None) -> dict:
        out = {}
        for c in config.conditions:
            out[c] = []
            for w in range(len(windows)):
                sel = [value(r) for r in ko if r["condition"] == c and r["window"] == w
                       and (setting is None or r["setting"] == setting)]
                out[c].append(key_fn[key](sel) if sel else None)
        return out

    key_fn = {"mean": lambda v: float(np.mean(v)),
              "ci": lambda v: list(wilson_ci(int(sum(v)), len(v)))}
    correct, first = (lambda r: r["correct"]), (lambda r: r.get("first_correct", False))
    clean = [r for r in rows if r["condition"] == "clean"]
    return {
        "windows": [list(w) for w in windows],
        "window_labels": [window_label(w, n_layers) for w in windows],
        "metrics": METRICS,
        "relative_accuracy": cells("mean", correct),
        "ci95": cells("ci", correct),
        "relative_accuracy_first_token": cells("mean", first),
        "ci95_first_token": cells("ci", first),
        "prob_change": cells("mean", lambda r: r["p_answer"] - r["p_clean"]),
        "prob_change_first_token": cells("mean", lambda r: r.get("p_first", 0.0)
                                         - r.get("p_first_clean", 0.0)),
        "relative_accuracy_by_setting": {s: cells("mean", correct, s) for s in config.settings},
        "relative_accuracy_first_token_by_setting": {s: cells("mean", first, s)
                                                     for s in config.settings},
        "n_kept": {s: sum(r["kept"] for r in clean if r["setting"] == s) for s in config.settings},
        "paper": PAPER,
        "config": asdict(config),
    }
