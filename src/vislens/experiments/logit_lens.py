"""Neo et al. A2: do image tokens become words? The logit lens on every image token.

Residual streams are captured at image positions only, then decoded one
layer at a time (final norm applied once: index L is the last layer's output
BEFORE the norm, unlike HF's `hidden_states[-1]`), keeping only the top-k and
the class words' probabilities, so [layers x tokens x vocab] never exists.
States: every residual, index 0 = the LM's input embeddings .. L = the last layer.
(Neo et al.'s released code, src/lvlm_lens.py:30-35, runs `norm` over every entry of
`hidden_states`, the last one included, which HF has already normed: a second norm
at the last layer. Not copied.)

Hit rule (`word_ids`): an image token "shows" its target at a layer when one of the
target's word tokens is in that layer's top-k (k = 5). A class's words are the HEAD
word of its name and of each listed synonym, each with its plural
(`vislens.data.answers.head_words`: "traffic light" -> light / lights / signal /
stoplight ...; "hot dog" -> dog / dogs; never "traffic" or "hot"). A word's token is
the first non-blank piece the tokenizer makes of it, written both with and without a
leading space ("giraffe" and " giraffe": SentencePiece "▁gir", byte-level "gir" and
"Ġgiraffe"). Object patches: any overlap with the target's mask (as Neo et al.'s
utils.find_overlapping_patches and A1); background: touched by no object.

Storage: one parquet row per image TOKEN (sample, target, position, tile, row,
col, coverage, background) whose list columns run over the layers: topk_ids
[layers][k] int32, topk_probs [layers][k] float32, class_prob [layers] float32,
hit [layers] bool. The rows are built as arrow arrays straight from the decoded
numpy arrays, so no Python object is made per (token, layer): a dict per
(token, layer) came to ~16 M of them for 170 LLaVA-NeXT images. Words are not
stored: `display_token(tokenizer.convert_ids_to_tokens(id))` gives them back.
The summary is a running tally over the parts, read one at a time and only the
columns it needs (SUMMARY_COLUMNS), so its memory does not grow with the images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from vislens.data.answers import head_words
from vislens.data.samples import Sample
from vislens.experiments import funnel
from vislens.experiments.funnel import Funnel
from vislens.experiments.selection import choose_targets
from vislens.experiments.stats import wilson_ci
from vislens.interventions import capture
from vislens.render.html import write_page
from vislens.render.plots import layer_curves
from vislens.render.viewer import LensToken, render_viewer
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor
from vislens.runs.rundir import RunDir

PROMPT = "describe this image ."
# LLaVA-1.5-7B, COCO
PAPER: LensPaper = {"hit_rate": 0.237, "peak_layer_mean": 25.7, "n_layers": 33}
# Target areas where LensConfig.area is "auto" (the default), by the samples' source:
# Neo et al.'s lens set is COCO val images with one object of 20,000-30,000 px^2 (170
# images); on ShapesWorld (96 px) the "large" shapes (26-36 px across) are >= 350 px^2.
AREAS = {"coco": (20000.0, 30000.0), "shapesworld": (350.0, float("inf"))}
HIT_RULE = ("an object patch (any overlap with the target's mask) is a hit at a layer when "
            "the top-{k} of its residual (final norm once + unembedding) holds a token of the "
            "target's words: the head word of its name and of each listed synonym, with "
            "plurals; a word's token = the first non-blank piece of the word written with and "
            "without a leading space")
MAX_LOGITS = 1 << 24  # logits decoded at once (64 MB in float32): rows per slice = this / vocab
SUMMARY_COLUMNS = ("sample", "coverage", "background", "hit", "class_prob")


@dataclass
class LensConfig:
    top_k: int = 5
    # target area range in px^2; "auto": by the samples' source (AREAS: on COCO Neo et al.'s
    # 20000-30000, on ShapesWorld >= 350); None: any area
    area: tuple[float, float] | str | None = "auto"
    object_coverage: float = 0.0  # 0: a patch is on the object when it overlaps it at all
    viewers: int = 3  # interactive HTML pages for the first N kept images
    seed: int = 0
    batch_size: int = 4
    prompt: str = PROMPT


def word_ids(tokenizer, name: str, synonyms: bool = True) -> list[int]:
    """Token ids a class shows up as in a top-k: for each of its head words (the last word
    of its name and of each listed synonym, with plurals: `head_words`), the first piece
    the tokenizer makes of the word written alone and after a space.

    A piece that is only whitespace starts no word: SentencePiece writes " giraffe" as
    "▁" then "▁g|ir|af|fe" on some vocabularies, and taking the bare "▁" made every "▁"
    in a top-k a hit for every class. The unknown token is never a word.
    """
    ids: set[int] = set()
    for word in head_words(name, synonyms):
        for text in (word, " " + word):
            toks = tokenizer.encode(text, add_special_tokens=False)
            first = next((t for t in toks if tokenizer.decode([t]).strip()), None)
            if first is not None:
                ids.add(int(first))
    unk = tokenizer.unk_token_id
    return sorted(i for i in ids if i != unk)


def on_object(cover: np.ndarray, object_coverage: float = 0.0) -> np.ndarray:
    """Object patches: any overlap (object_coverage 0, A1's rule), else that share."""
    cover = np.asarray(cover, dtype=float)
    with np.errstate(invalid="ignore"):
        return cover > 0 if object_coverage <= 0 else cover >= object_coverage


def default_area(samples: list[Sample]) -> tuple[float, float] | None:
    """The target area range of AREAS for the samples' source (None: any area)."""
    sources = {s.meta.get("source") for s in samples}
    return AREAS.get(sources.pop()) if len(sources) == 1 else None


def display_token(token: str | None) -> str:
    """A vocabulary entry as a word: sub-word space markers (SentencePiece, GPT-2) dropped."""
    token = token or ""
    return token.replace("\u2581", " ").replace("\u0120", " ").strip() or token


def execute(vlm: ModelHandle, samples: list[Sample], config: LensConfig, out: Path, meta: dict,
            progress=None) -> LensSummary:
    """Run into directory `out` (resuming), plot, and write summary.json."""
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    run_dir = RunDir(out, {"experiment": "logit-lens", **meta, **cfg}, key=["sample"])
    summary = cast(LensSummary, run(vlm, samples, config, run_dir, progress))
    summary["model"] = meta.get("model", summary["model"])
    curves = {"object patches": summary["per_layer"]} if summary["layout"] else {}
    curves["every image token"] = summary["per_layer_image"]
    summary["plot"] = str(layer_curves(
        curves, run_dir.path / "logit_lens.png",
        f"Logit lens ({summary['model']}): object word in top-{config.top_k}",
        "share of patches"))
    run_dir.write_summary(summary)
    return summary


def run(vlm: ModelHandle, samples: list[Sample], config: LensConfig, out: RunDir,
        progress=None) -> dict:
    if not samples:
        raise ValueError("no samples for the logit lens; check --data / --n")
    area = default_area(samples) if config.area == "auto" else config.area
    targets = choose_targets(samples, area)
    chosen = [(s, t) for s, t in zip(samples, targets) if t is not None]
    todo = [(s, t) for s, t in chosen if not out.done(sample=s.id)]
    chunks = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    viewer_dir = out.path / "viewer"
    kept_ids = [s.id for s, _ in chosen]
    ex = executor(vlm)  # this process, or a vislens.runs.ray_pool.RayPool: one unit per chunk
    ex.map(_chunk, chunks, config, viewer_dir, kept_ids, out=out, progress=progress,
           label="logit lens")
    summary = summarise(out.tables(SUMMARY_COLUMNS), ex.info, config, viewer_dir)
    # the range the targets were chosen in (None: any area; an open end as None)
    summary["area"] = None if area is None else [float(a) if np.isfinite(a) else None
                                                 for a in area]
    summary["funnel"] = funnel.tally(samples, targets, None, ("lens",))
    return summary


def _chunk(vlm, out: RunDir, chunk, config: LensConfig, viewer_dir: Path, kept_ids: list[str]):
    for table in _chunk_tables(vlm, chunk, config, viewer_dir, kept_ids):
        out.add_table(table)


@torch.no_grad()
def _chunk_tables(vlm, chunk, config: LensConfig, viewer_dir: Path, kept_ids: list[str]
                  ) -> Iterator[pa.Table]:
    """One table per image of the chunk: a row per image token, lists over layers."""
    batch = vlm.prepare([s.image for s, _ in chunk], [config.prompt] * len(chunk))
    tm = batch.token_map
    positions = [tm.image_positions(b) for b in range(len(chunk))]
    with capture(vlm, positions, residual=True) as cap:
        vlm.forward(batch, logits_to_keep=1)
    for b, (sample, target) in enumerate(chunk):
        inst = sample.instances[target]
        cover, background = _object_cover(tm, b, sample, inst, positions[b])
        cls = torch.tensor(word_ids(vlm.tokenizer, inst.name), dtype=torch.long)
        cells = tm.cells(positions[b], b)
        decoded = [_decode(vlm, cap.of("residual", layer, b), cls, config.top_k)
                   for layer in range(vlm.num_layers + 1)]
        # [layers, tokens, ...] -> [tokens, layers, ...]: a row per token
        ids, probs, class_p, hit = (np.stack([d[k] for d in decoded], 1) for k in range(4))
        n = len(positions[b])
        yield pa.table({
            "sample": pa.array([sample.id] * n, pa.string()),
            "target": pa.array([inst.name] * n, pa.string()),
            "position": pa.array(np.asarray(positions[b], dtype=np.int64)),
            "row": pa.array(cells[:, 1].astype(np.int64)),
            "col": pa.array(cells[:, 2].astype(np.int64)),
            "tile": pa.array(cells[:, 0].astype(np.int64)),
            "coverage": pa.array(cover.astype(np.float64)),
            "background": pa.array(background),
            "topk_ids": _lists(ids.astype(np.int32)),
            "topk_probs": _lists(probs.astype(np.float32)),
            "class_prob": _lists(class_p.astype(np.float32)),
            "hit": _lists(hit.astype(bool)),
        })
        if tm.geometric and sample.id in kept_ids[:config.viewers]:
            _write_viewer(vlm, sample, inst, tm, b, positions[b], cells, cover, ids, probs,
                          config, viewer_dir)
        del decoded, ids, probs, class_p, hit


def _object_cover(tm, b: int, sample, inst, positions) -> tuple[np.ndarray, np.ndarray]:
    """Per image token: the share of it the target covers, and whether no object touches it.
    Without a layout (generic family) no token has pixels: coverage NaN, never background,
    and the image-token tallies are all the summary can say."""
    if not tm.geometric:
        return np.full(len(positions), np.nan), np.zeros(len(positions), dtype=bool)
    pos, frac = tm.coverage(b, inst.mask)
    order = {int(p): i for i, p in enumerate(pos)}
    cover = np.array([frac[order[int(p)]] for p in positions])
    background = np.ones(len(positions), dtype=bool)
    for other in sample.instances:
        opos, ofrac = tm.coverage(b, other.mask)
        oorder = {int(p): i for i, p in enumerate(opos)}
        background &= np.array([ofrac[oorder[int(p)]] == 0 for p in positions])
    return cover, background


def _lists(x: np.ndarray) -> pa.Array:
    """A [rows, a, b, ...] numpy array as a column of nested fixed-size lists, one per row."""
    arr: pa.Array = pa.array(np.ascontiguousarray(x).reshape(-1))
    for size in reversed(x.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _write_viewer(vlm, sample, inst, tm, b, positions, cells, cover, ids, probs,
                  config: LensConfig, viewer_dir: Path) -> None:
    """The interactive page of one image; ids / probs are [tokens, layers, k]."""
    wanted = np.unique(ids).tolist()
    words = dict(zip(wanted, (display_token(t) for t in
                              vlm.tokenizer.convert_ids_to_tokens(wanted)), strict=True))
    toks = [LensToken(position=int(p), row=int(cells[t, 1]), col=int(cells[t, 2]),
                      box=tuple(tm.boxes([p], b)[0]),
                      topk=[[(words[int(i)], float(q)) for i, q in zip(ids[t, layer],
                                                                      probs[t, layer])]
                            for layer in range(ids.shape[1])],
                      on_object=bool(on_object(cover[t], config.object_coverage)))
            for t, p in enumerate(positions)]
    page = render_viewer(sample.image, toks, title=f"logit lens: {sample.id} "
                         f"({inst.name}, {vlm.name})",
                         object_words=head_words(inst.name, synonyms=False))
    write_page(viewer_dir / f"{sample.id}.html", page)


def _decode(vlm, residual: torch.Tensor, cls: torch.Tensor, top_k: int) -> tuple:
    """(top-k ids, top-k probs, class prob, hit) of each residual row, as numpy arrays.

    Rows are decoded a slice at a time so that no more than MAX_LOGITS logits exist at
    once: OneVision's 2929 image tokens x a 152k vocabulary would be 1.8 GB of float32
    per layer (and as much again for the softmax).
    """
    vocab = vlm.lm_head.weight.shape[0]
    step = max(1, MAX_LOGITS // vocab)
    parts = []
    for chunk in residual.split(step):
        probs = torch.softmax(vlm.unembed(chunk).float(), dim=-1)
        top_p, top_i = probs.topk(top_k, dim=-1)
        cls_p = probs[:, cls.to(probs.device)].max(-1).values if len(cls) \
            else torch.zeros(len(probs))
        hit = (torch.isin(top_i, cls.to(top_i.device)).any(-1) if len(cls)
               else torch.zeros(len(probs), dtype=torch.bool))
        parts.append([t.cpu() for t in (top_i, top_p, cls_p, hit)])
        del probs
    return tuple(torch.cat([p[k] for p in parts]).numpy() for k in range(4))


def layer_matrix(column: pa.ChunkedArray | pa.Array, n_layers: int) -> np.ndarray:
    """A list-over-layers column as a [rows, n_layers] numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return flat.reshape(-1, n_layers)


class LensTally:
    """The summary's counts, updated one table of token rows at a time."""

    def __init__(self, n_layers: int, object_coverage: float):
        self.n_layers, self.object_coverage = n_layers, object_coverage
        self.samples: set[str] = set()
        self.n_obj = self.n_obj_hits = self.n_bg = self.n_bg_hits = 0
        self.peak_sum = 0
        self.layer_hits = np.zeros(n_layers, dtype=np.int64)
        # every image token, whatever it shows: the rate a layout-free model can report
        self.n_img = self.n_img_hits = 0
        self.img_layer_hits = np.zeros(n_layers, dtype=np.int64)

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.samples.update(pc.unique(table.column("sample")).to_pylist())
        cover = table.column("coverage").to_numpy()
        bg = table.column("background").to_numpy(zero_copy_only=False).astype(bool)
        hit = layer_matrix(table.column("hit"), self.n_layers).astype(bool)
        prob = layer_matrix(table.column("class_prob"), self.n_layers)
        obj = on_object(cover, self.object_coverage)
        any_hit = hit.any(1)
        self.n_obj += int(obj.sum())
        self.layer_hits += hit[obj].sum(0)
        found = obj & any_hit
        self.n_obj_hits += int(found.sum())
        # a patch's peak: the hit layer where the class word is most likely (first on ties)
        self.peak_sum += int(np.argmax(np.where(hit[found], prob[found], -1.0), 1).sum())
        self.n_bg += int(bg.sum())
        self.n_bg_hits += int((bg & any_hit).sum())
        self.n_img += len(hit)
        self.n_img_hits += int(any_hit.sum())
        self.img_layer_hits += hit.sum(0)


class LensPaper(TypedDict):
    """Neo et al.'s numbers the report sets beside ours (PAPER)."""

    hit_rate: float
    peak_layer_mean: float
    n_layers: int


class LensSummary(TypedDict):
    """summary.json of `vislens logit-lens` (what `execute` returns): `summarise`'s keys,
    then `run`'s (area, funnel) and `execute`'s (plot; model set to the run's name). Read by
    report/sections.py `logit_lens_section` and experiments/study.py `_headline`;
    tests/test_summary_contract.py checks both against these keys. Rates are shares (0-1);
    the object / background ones are None on a family without a layout."""

    model: str
    layout: bool  # False: no token has pixels; only the image-token rates exist
    hit_rate: float | None  # object patches whose top-k holds the word at some layer
    hit_rate_ci95: list[float] | None
    background_rate_ci95: list[float] | None
    peak_layer_mean: float | None  # mean over hit patches of their best layer
    n_layers: int  # residual states: LM layers + the embeddings
    per_layer: list[float]  # share of object patches hit, per residual state
    background_rate: float | None  # background patches hit
    image_hit_rate: float  # any image token hit
    per_layer_image: list[float]
    n_image_tokens: int
    n_images: int
    n_object_patches: int
    n_background_patches: int
    viewer: list[str]  # the interactive pages written, one per image
    hit_rule: str
    paper: LensPaper
    config: dict[str, Any]
    area: list[float | None] | None  # target area range (None: any; open end None)
    funnel: Funnel
    plot: str  # logit_lens.png


def summarise(tables: Iterable[pa.Table], vlm, config: LensConfig, viewer_dir: Path) -> dict:
    """Hit rate over object patches, best layer, per-layer curve, background false alarms.

    tables: token rows (at least SUMMARY_COLUMNS), e.g. the run's parts one at a time.
    """
    n_layers = vlm.num_layers + 1
    tally = LensTally(n_layers, config.object_coverage)
    for table in tables:
        tally.add(table)
    n_obj, n_bg, n_img = tally.n_obj, tally.n_bg, tally.n_img
    layout = vlm.family.geometric
    return {
        "model": getattr(vlm, "name", ""),
        "layout": layout,  # False: no token has pixels; only the image-token rates exist
        "hit_rate": tally.n_obj_hits / n_obj if n_obj else (0.0 if layout else None),
        # patches of one image are not independent: the interval is a lower bound on the
        # real uncertainty (report n_images beside it)
        "hit_rate_ci95": list(wilson_ci(tally.n_obj_hits, n_obj)) if n_obj else None,
        "background_rate_ci95": list(wilson_ci(tally.n_bg_hits, n_bg)) if n_bg else None,
        "peak_layer_mean": tally.peak_sum / tally.n_obj_hits if tally.n_obj_hits else None,
        "n_layers": n_layers,
        "per_layer": [int(h) / n_obj if n_obj else 0.0 for h in tally.layer_hits],
        "background_rate": tally.n_bg_hits / n_bg if n_bg else (0.0 if layout else None),
        # any image token whose top-k holds the target's word (object or not)
        "image_hit_rate": tally.n_img_hits / n_img if n_img else 0.0,
        "per_layer_image": [int(h) / n_img if n_img else 0.0 for h in tally.img_layer_hits],
        "n_image_tokens": n_img,
        "n_images": len(tally.samples),
        "n_object_patches": n_obj,
        "n_background_patches": n_bg,
        "viewer": sorted(str(p) for p in viewer_dir.glob("*.html")),
        "hit_rule": HIT_RULE.format(k=config.top_k) if config.object_coverage <= 0 else
        HIT_RULE.format(k=config.top_k).replace("any overlap with",
                                                f">= {config.object_coverage:g} of it on"),
        "paper": PAPER,
        "config": asdict(config),
    }
