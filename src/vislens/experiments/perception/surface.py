"""Liu et al. B4: information present in the image values but not surfaced.

On multiple-choice items (a reference image + candidates, BLINK style) two answers
are compared: the model's own, and a readout from image values (the candidate
whose mean image value is most cosine-similar to the reference's, per layer). The
readout's layer is chosen on a held-out half of the items (even indices) and both
are scored on the other half, so the layer choice never sees the scored items.

Chance: a readout guessing among n choices is right on 1/n of the items, so on "values
right, model wrong" it scores (1/n) x (1 - model accuracy) (`present_not_surfaced_chance`,
computed per item from the model's misses). A permutation baseline (every item's
candidates shuffled under the readout's pick, `seed`-ed draws) gives the null's 95% range
and a one-sided p-value for the values accuracy and for the headline; `values_beat_chance`
says whether the values readout beats the permuted one (p < alpha). When it does not, the
headline count is noise.

Several images: families that read several images in one prompt (OneVision,
Qwen2.5-VL) get them as separate images, in order; a one-image model reads ONE
composite (a 2x2 grid: reference top-left, then the candidates in reading order,
each cell the first image's size). The readout encodes every image on its own.

The model's choice is read the way BLINK writes answers, "(A)", "(B)", ...: each
choice's whole answer string is scored by its log-probability after the prompt
(teacher forced, so "(" / "(A" / "A)" splits of any tokenizer are handled), and
the most likely one is the model's answer. Tokenizers without those characters
(the toys' word vocabularies) fall back to a greedy answer, parsed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypedDict, cast

import numpy as np
import torch
from PIL import Image

from vislens.data.resolve import open_task
from vislens.experiments.perception import metrics as M
from vislens.experiments.perception.features import block_keys, extract
from vislens.experiments.perception.perceive import PROMPT
from vislens.experiments.stats import Rate, permutation_null, rate
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor

PAPER = {"blink-art-style": 0.333}  # share of items solved by the values, missed by the model
READOUT_SOURCES = ("values", "projector", "vision")


@dataclass
class SurfaceConfig:
    data: str = "shapesworld"
    n: int = 40
    kind: str = "fill"  # ShapesWorld attribute the items ask about (fill ~ "style")
    layers: tuple[int, ...] | None = None
    prompt: str = PROMPT  # prompt of the single-image readout passes
    max_new_tokens: int = 8
    batch_size: int = 8
    sources: tuple[str, ...] = READOUT_SOURCES  # readouts besides the model's own answer
    seed: int = 0  # permutation baseline draws
    n_permutations: int = 1000  # draws of the permutation baseline
    alpha: float = 0.05  # "beats chance" = one-sided permutation p-value below this

    def validate(self) -> None:
        unknown = set(self.sources) - set(READOUT_SOURCES)
        if unknown or "values" not in self.sources:
            raise ValueError(f"--sources must include values and be among "
                             f"{', '.join(READOUT_SOURCES)}; got {', '.join(self.sources)}")
        if self.n < 2:
            raise ValueError("surface needs at least 2 items (half choose the layer); raise --n")

    def to_dict(self) -> dict:
        return asdict(self)


def load_items(config: SurfaceConfig) -> list:
    options = {"kind": config.kind} if config.data.startswith("shapesworld") else {}
    return open_task("multiple-choice", config.data, config.n, **options)[:config.n]


def composite(images: Sequence[Image.Image]) -> Image.Image:
    """The images on a 2 (or more) column grid, each cell the first image's size."""
    w, h = images[0].size
    cols = 2
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, im in enumerate(images):
        canvas.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return canvas


def letters(n: int) -> list[str]:
    return [f"({chr(ord('A') + c)})" for c in range(n)]


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
    """Which choice a generated answer names: "(B)", "B", or the choice's own text."""
    low = text.lower()
    for i, c in enumerate(choices):
        if c.lower() and c.lower() in low:
            return i
    m = re.search(r"\(?\b([A-H])\b\)?", text)
    if m and ord(m.group(1)) - ord("A") < len(choices):
        return ord(m.group(1)) - ord("A")
    return None


def shown_images(vlm, item) -> list[Image.Image] | Image.Image:
    """What the model sees of an item: its images, or their composite for one-image models."""
    return list(item.images) if vlm.family.multi_image else composite(item.images)


def _scoreable(vlm) -> bool:
    """Can the answer strings be written in this vocabulary (no unknown token)?"""
    unk = vlm.tokenizer.unk_token_id
    ids = vlm.tokenizer("(A) (B)", add_special_tokens=False)["input_ids"]
    return unk is None or unk not in ids


@torch.no_grad()
def choice_scores(vlm, item, blocked: dict | None = None) -> list[float]:
    """log p(answer string | prompt) for each choice's "(X)", one batched pass per item."""
    n = len(item.choices)
    shown = shown_images(vlm, item)
    batch = vlm.prepare([shown] * n, [item.prompt()] * n, answer_prefixes=letters(n))
    plain = vlm.prepare([shown], [item.prompt()])
    prompt_len = int(plain.attention_mask[0].sum())
    lengths = batch.attention_mask.sum(1).tolist()
    m = [int(ln) - prompt_len for ln in lengths]  # each answer string's token count
    for c in range(n):
        row = batch.input_ids[c][batch.attention_mask[c] > 0][:prompt_len]
        if m[c] < 1 or not torch.equal(row, plain.input_ids[0][plain.attention_mask[0] > 0]):
            raise ValueError("the answer string changed how the prompt tokenises; cannot score "
                             "choices by likelihood")
    keep = max(m) + 1
    with block_keys(vlm, batch, blocked):
        logits = vlm.forward(batch, logits_to_keep=keep).logits.float()
    logp = torch.log_softmax(logits, -1)  # position j predicts token S - keep + j + 1
    scores = []
    for c in range(n):
        ids = batch.input_ids[c, -m[c]:]
        rows = logp[c, keep - m[c] - 1:keep - 1]
        scores.append(float(rows.gather(1, ids[:, None].to(rows.device)).sum()))
    return scores


@torch.no_grad()
def model_answers(vlm, items, batch_size: int = 8, blocked: dict | None = None,
                  max_new_tokens: int = 8) -> list[dict]:
    """The model's choice per item: the most likely "(X)" answer string where the
    vocabulary can write it, else its greedy answer parsed (None = no choice named,
    counted as wrong)."""
    if _scoreable(vlm):
        out = []
        for it in items:
            scores = choice_scores(vlm, it, blocked)
            out.append({"choice": int(np.argmax(scores)), "text": letters(len(scores))[
                int(np.argmax(scores))], "mode": "answer-likelihood"})
        return out
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = vlm.prepare([shown_images(vlm, it) for it in chunk],
                            [it.prompt() for it in chunk])
        with block_keys(vlm, batch, blocked):
            texts = vlm.decode(vlm.generate(batch, max_new_tokens=max_new_tokens))
        for text, it in zip(texts, chunk, strict=True):
            out.append({"choice": parse_choice(text, it.choices), "text": text,
                        "mode": "generate"})
    return out


def readout(vlm, item, config: SurfaceConfig) -> dict[str, list[int]]:
    """Per source (values/L, projector, vision): the candidate most similar to the
    reference by mean image feature."""
    if len(item.images) != len(item.choices) + 1:
        raise ValueError(f"item {item.id}: surface reads a reference image plus one image per "
                         f"choice (BLINK Art Style / Visual Similarity); it has "
                         f"{len(item.images)} images for {len(item.choices)} choices")
    feats = extract(vlm, item.images, [config.prompt] * len(item.images), layers=config.layers,
                    sources=config.sources, batch_size=config.batch_size)
    out = {}
    for src in feats[0].sources:
        means = np.stack([f.sources[src].mean(0).numpy() for f in feats])
        out[src] = int(M.cosine(means[1:], means[:1])[:, 0].argmax())
    return out


def run(vlm: ModelHandle, config: SurfaceConfig, out, progress: Callable | None = None) -> dict:
    items = load_items(config)
    config.validate()
    if len(items) < 2:
        raise ValueError("surface needs at least 2 items (half choose the layer); raise --n")
    todo = [(i, it) for i, it in enumerate(items) if not out.done(item=str(i))]
    chunks = [todo[k:k + config.batch_size] for k in range(0, len(todo), config.batch_size)]
    ex = executor(vlm)  # this process, or a vislens.runs.ray_pool.RayPool: one unit per chunk
    ex.map(_chunk, chunks, config, out=out, progress=progress, label="surface")
    return summarise(out.rows(), ex.info.num_layers, config)


def _chunk(vlm, out, chunk, config: SurfaceConfig) -> None:
    answers = model_answers(vlm, [it for _, it in chunk], config.batch_size,
                            max_new_tokens=config.max_new_tokens)
    for (i, it), ans in zip(chunk, answers, strict=True):
        out.add({"item": str(i), "id": it.id, "truth": it.answer_index,
                 "n_choices": len(it.choices),
                 "model": -1 if ans["choice"] is None else ans["choice"],
                 "model_text": ans["text"], "mode": ans["mode"],
                 "readout": json.dumps(readout(vlm, it, config))})


def answers(vlm, _out, items: list, batch_size: int, blocked: dict | None = None) -> list[dict]:
    """model_answers as an executor unit (vislens.runs.local; artifacts shares its items out)."""
    return model_answers(vlm, items, batch_size, blocked=blocked)


class _SurfaceOptional(TypedDict, total=False):
    projector_accuracy: Rate  # where config.sources reads the projector output
    vision_accuracy: Rate  # and the vision encoder's


class SurfaceSummary(_SurfaceOptional):
    """summary.json of `vislens surface` (what `execute` returns): `summarise`'s keys, then
    `execute`'s (plot). Items alternate: even ones choose the layer, odd ones are scored.
    Read by report/sections.py `surface_section` and experiments/study.py `_headline`;
    tests/test_summary_contract.py checks both against these keys."""

    n_items: int
    n_scored: int
    n_heldout: int  # items the layer is chosen on
    kind: str  # what the items ask
    best_layer: int
    heldout_values_accuracy: dict[str, float]  # layer -> accuracy on the choosing half
    values_accuracy: Rate  # the values readout at best_layer, scored items
    model_accuracy: Rate  # the model's own answer
    chance_accuracy: float  # mean of 1 / choices
    model_unanswered: int
    answer_mode: str
    solved_by_values_not_model: int
    solved_by_model_not_values: int
    both: int
    neither: int
    present_not_surfaced: Rate  # values right, model wrong
    present_not_surfaced_chance: float | None  # that rate for a readout guessing
    values_permutation: dict[str, Any]  # the values readout against shuffled candidates
    present_not_surfaced_permutation: dict[str, Any]
    values_beat_chance: bool  # permutation p-value below config.alpha
    seed: int
    paper: dict[str, float]  # PAPER
    plot: str  # surface.png


def summarise(rows: list[dict], num_layers: int, config: SurfaceConfig) -> dict:
    rows = sorted(rows, key=lambda r: int(r["item"]))
    held = [r for r in rows if int(r["item"]) % 2 == 0]
    scored = [r for r in rows if int(r["item"]) % 2 == 1]
    layers = list(range(num_layers)) if config.layers is None else list(config.layers)
    readouts = {r["item"]: json.loads(r["readout"]) for r in rows}

    def right(rs, src):
        return [readouts[r["item"]][src] == r["truth"] for r in rs]

    per_layer = {ly: float(np.mean(right(held, f"values/{ly}"))) for ly in layers}
    best = max(per_layer, key=lambda ly: (per_layer[ly], -ly))
    values_ok = np.array(right(scored, f"values/{best}"))
    model_ok = np.array([r["model"] == r["truth"] for r in scored])
    n = len(scored)
    counts = {"solved_by_values_not_model": int((values_ok & ~model_ok).sum()),
              "solved_by_model_not_values": int((~values_ok & model_ok).sum()),
              "both": int((values_ok & model_ok).sum()),
              "neither": int((~values_ok & ~model_ok).sum())}
    hidden = rate((values_ok & ~model_ok).tolist())
    n_choices = np.array([r["n_choices"] for r in scored])
    truth = np.array([r["truth"] for r in scored])
    picked = np.array([readouts[r["item"]][f"values/{best}"] for r in scored])
    null = permuted(picked, truth, n_choices, config.n_permutations, config.seed)
    null_values = permutation_null(float(values_ok.mean()) if n else 0.0,
                                   null.mean(1) if n else [0.0], level=0.95)
    null_hidden = permutation_null(float((values_ok & ~model_ok).mean()) if n else 0.0,
                                   (null & ~model_ok).mean(1) if n else [0.0], level=0.95)
    beats = bool(n and null_values["p_value"] < config.alpha)
    summary = {
        "n_items": len(rows), "n_scored": n, "n_heldout": len(held), "kind": config.kind,
        "best_layer": best, "heldout_values_accuracy": {str(k): round(v, 4)
                                                          for k, v in per_layer.items()},
        "values_accuracy": _rounded(rate(values_ok.tolist())),
        "model_accuracy": _rounded(rate(model_ok.tolist())),
        "chance_accuracy": round(float(np.mean([1 / r["n_choices"] for r in scored])), 4),
        "model_unanswered": int(sum(r["model"] < 0 for r in scored)),
        "answer_mode": rows[0]["mode"] if rows else "",
        **counts,
        "present_not_surfaced": _rounded(hidden),
        # a readout guessing among n choices: right with 1/n, on the items the model misses
        "present_not_surfaced_chance": round(float(np.mean((~model_ok) / n_choices)), 4)
        if n else None,
        "values_permutation": null_values,
        "present_not_surfaced_permutation": null_hidden,
        "values_beat_chance": beats,
        "seed": config.seed,
        "paper": PAPER,
    }
    for src in ("projector", "vision"):
        if all(src in readouts[r["item"]] for r in scored):
            summary[f"{src}_accuracy"] = _rounded(rate(right(scored, src)))
    return summary


def permuted(picked: np.ndarray, truth: np.ndarray, n_choices: np.ndarray, draws: int,
             seed: int) -> np.ndarray:
    """The permutation baseline: in each draw every item's candidates are shuffled (seeded)
    under the readout's pick, which then lands on a random candidate of its item, so the
    link between readout and answer is broken and nothing else changes. -> [draws, items]
    bools: the shuffled readout is right."""
    rng = np.random.default_rng(seed)
    out = np.zeros((draws, len(picked)), dtype=bool)
    for j, (p, t, k) in enumerate(zip(picked, truth, n_choices, strict=True)):
        perms = rng.permuted(np.tile(np.arange(k), (draws, 1)), axis=1)
        out[:, j] = perms[:, p] == t
    return out


def _rounded(r: Rate) -> Rate:
    """A rate dict with its numbers rounded for the summary."""
    return {"rate": None if r["rate"] is None else round(r["rate"], 4),
            "ci95": None if r["ci95"] is None else [round(x, 4) for x in r["ci95"]], "n": r["n"]}


def execute(vlm: ModelHandle, config: SurfaceConfig, out, meta: dict,
            progress: Callable | None = None
            ) -> SurfaceSummary:
    """Run into directory `out` (resuming), plot, write summary.json."""
    from vislens.experiments.perception.plots import surface_plot
    from vislens.runs.rundir import RunDir

    run_dir = RunDir(out, {"experiment": "surface", **meta, **asdict(config)}, key=["item"])
    summary = cast(SurfaceSummary, run(vlm, config, run_dir, progress))
    summary["plot"] = str(surface_plot(summary, run_dir.path / "surface.png"))
    run_dir.write_summary(summary)
    return summary
