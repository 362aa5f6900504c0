"""Which image patches does the answer attend to, per layer and head?

One query position per image (the answer position by default: the last prompt
token, whose output is the first answer token) has its post-softmax attention
row captured in every layer, knockouts included (vislens.interventions.capture).
Each row is split into what a person asks of it:

- the attention to every image patch token, per head, kept as float16 in one
  .npz per image (maps/), because a 7B model's 32 layers x 32 heads x up to
  ~2,900 patch tokens are too many numbers for table rows;
- its mass on the image (patch tokens and anyres newline tokens, which are
  image-side but sit on no patch, so they count here and are never drawn), on
  the first token (real models park most of their attention on it: an
  attention sink, not a look at the prompt's first word) and on the remaining
  text, per layer and head; the three add up to 1;
- whether it looks at the object the question names: the object's tokens'
  share of the image attention next to their share of the image tokens (what
  attention spread evenly over the image would give), and where the peak is.

Rows (one per image and layer, scalars and per-head lists) go to a resumable
RunDir; the viewers and the summary are rebuilt from what is on disk.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import torch

from vislens.data.samples import SETTINGS, Sample
from vislens.experiments import funnel
from vislens.experiments.funnel import Funnel
from vislens.experiments.logit_lens import display_token
from vislens.experiments.prompts import question
from vislens.experiments.selection import choose_targets
from vislens.experiments.stats import Rate, bootstrap_columns, rate
from vislens.interventions import capture
from vislens.render.attention_viewer import AttentionMaps, render_attention_viewer
from vislens.render.html import write_page
from vislens.render.plots import layer_curves
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor
from vislens.runs.rundir import RunDir

MASSES = ("image", "text", "first")
QUERY_HELP = ('"last" (the answer position: the last prompt token), -N (N-th token from the '
              'end), N (N-th token from the start, 0 = the first) or a word of the prompt '
              "(its last occurrence, e.g. \"star\")")


@dataclass
class AttentionConfig:
    setting: str = "polling"
    query: str = "last"
    area: tuple[float, float] | None = None
    viewers: int = 3  # interactive HTML pages for the first N kept images
    seed: int = 0
    batch_size: int = 4

    def validate(self) -> None:
        """Every option checked before anything is loaded or written."""
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose from "
                             f"{', '.join(SETTINGS)}")
        parse_query(self.query)
        if self.viewers < 0:
            raise ValueError(f"--viewers must be 0 or more (got {self.viewers})")


def parse_query(spec: str) -> tuple[str, int | str]:
    """("index", i) for a position counted like a Python index over the prompt's real
    tokens (last = -1), or ("word", w) for the last token that reads as w."""
    text = str(spec).strip()
    if not text:
        raise ValueError(f"--query is empty; give {QUERY_HELP}")
    if text.lower() == "last":
        return "index", -1
    if re.fullmatch(r"[+-]?\d+", text):
        return "index", int(text)
    if any(c.isspace() for c in text):
        raise ValueError(f"--query {text!r} is several words; give one token's text")
    return "word", text


def query_column(vlm, batch, sample: int, spec: str) -> int:
    """The batch column of the query token of one (left-padded) sample."""
    kind, value = parse_query(spec)
    valid = np.flatnonzero(batch.attention_mask[sample].cpu().numpy() > 0)
    if kind == "index":
        if not -len(valid) <= int(value) < len(valid):
            raise ValueError(f"--query {spec} is outside the prompt ({len(valid)} tokens)")
        return int(valid[int(value)])
    image = set(batch.token_map.image_positions(sample).tolist())
    image |= set(batch.token_map.newline_positions(sample).tolist())
    ids = batch.input_ids[sample].cpu().tolist()
    tokens = vlm.tokenizer.convert_ids_to_tokens([ids[c] for c in valid])
    hits = [int(c) for c, t in zip(valid, tokens, strict=True)
            if c not in image and display_token(t).lower() == str(value).lower()]
    if not hits:
        raise ValueError(f"--query {value!r} is no token of the prompt "
                         f"{batch.texts[sample]!r}; pick one of its words or 'last'")
    return hits[-1]


def execute(vlm: ModelHandle, samples: list[Sample], config: AttentionConfig, out: Path, meta: dict,
            progress=None) -> AttentionSummary:
    """Run into directory `out` (resuming), plot, and write summary.json."""
    config.validate()
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    run_dir = RunDir(out, {"experiment": "attention", **meta, **cfg}, key=["sample"])
    summary = cast(AttentionSummary, run(vlm, samples, config, run_dir, progress))
    summary["model"] = meta.get("model", summary["model"])
    name = summary["model"]
    where = f"{summary['query_label']}, {name}"
    curves = {f"image tokens{' (incl. row newlines)' if summary['has_newlines'] else ''}":
              summary["per_layer"]["image"],
              "text tokens": summary["per_layer"]["text"],
              f"first token ({summary['first_token']})": summary["per_layer"]["first"]}
    bands = dict(zip(curves, (summary["per_layer_ci95"][m] for m in MASSES), strict=True))
    summary["plot"] = str(layer_curves(
        curves, run_dir.path / "attention_mass.png",
        f"Where the query's attention goes ({where})", "share of attention (mean over heads)",
        bands=bands, ylim=(-0.02, 1.02), legend_below=True))
    obj = {"object's tokens: share of the image attention": summary["object_share"],
           "object's tokens: share of the image tokens": summary["area_share"]}
    summary["object_plot"] = str(layer_curves(
        obj, run_dir.path / "attention_object.png",
        f"Does the query look at the object? ({where})", "share",
        bands={next(iter(obj)): summary["object_share_ci95"]}, ylim=(-0.02, 1.02),
        legend_below=True))
    run_dir.write_summary(summary)
    return summary


def run(vlm: ModelHandle, samples: list[Sample], config: AttentionConfig, out: RunDir,
        progress=None) -> dict:
    if not samples:
        raise ValueError("no samples for the attention view; check --data / --n")
    vlm.require_layout("maps object masks to image tokens")
    config.validate()
    targets = choose_targets(samples, config.area)
    chosen = [(s, t) for s, t in zip(samples, targets) if t is not None]
    todo = [(s, t) for s, t in chosen if not out.done(sample=s.id)]
    chunks = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    ex = executor(vlm)  # this process, or a vislens.runs.ray_pool.RayPool: one unit per chunk
    ex.map(_chunk, chunks, config, out=out, progress=progress, label="attention")
    viewers = write_viewers(ex.info, chosen[:config.viewers], out.path)
    summary = summarise(out.rows(), ex.info, config, viewers)
    summary["funnel"] = funnel.tally(samples, targets, None, (config.setting,))
    return summary


def _chunk(vlm, out: RunDir, chunk, config: AttentionConfig) -> None:
    for row in _chunk_rows(vlm, chunk, config, out):
        out.add(row)


def maps_path(run_dir: Path, sample_id: str) -> Path:
    return Path(run_dir) / "maps" / (re.sub(r"[^A-Za-z0-9._-]", "_", sample_id) + ".npz")


@torch.no_grad()
def _chunk_rows(vlm, chunk, config: AttentionConfig, out: RunDir):
    qs = [question(s, t, config.setting) for s, t in chunk]
    batch = vlm.prepare([s.image for s, _ in chunk], [q.prompt for q in qs],
                        [q.answer_prefix or None for q in qs])
    tm = batch.token_map
    queries = [[query_column(vlm, batch, b, config.query)] for b in range(len(chunk))]
    with capture(vlm, [[] for _ in chunk], residual=False, attention_queries=queries) as cap:
        logits = vlm.forward(batch, logits_to_keep=1).logits[:, -1]
    predicted = logits.argmax(-1).tolist()
    ids = batch.input_ids.cpu().numpy()
    for b, ((sample, target), q) in enumerate(zip(chunk, qs, strict=True)):
        att = torch.stack([cap.of("attention", layer, b)[0].float().cpu()
                           for layer in range(vlm.num_layers)]).numpy()  # [L, H, S]
        valid = np.flatnonzero(batch.attention_mask[b].cpu().numpy() > 0)
        first = int(valid[0])
        patches = tm.image_positions(b)
        newlines = tm.newline_positions(b)
        side = np.zeros(att.shape[-1], dtype=bool)
        side[patches] = True
        side[newlines] = True
        side[first] = False  # an image token in first place counts as the first token
        text = np.zeros(att.shape[-1], dtype=bool)
        text[valid] = True
        text &= ~side
        text[first] = False
        mass = {"image": att[..., side].sum(-1), "text": att[..., text].sum(-1),
                "first": att[..., first], "newline": att[..., newlines].sum(-1)}
        patch = att[..., patches]  # [L, H, N]
        obj = np.isin(patches, tm.positions(b, sample.instances[target].mask))
        cells = tm.cells(patches, b)
        maps = AttentionMaps(
            patch=patch.astype(np.float16), tile=cells[:, 0], row=cells[:, 1], col=cells[:, 2],
            box=tm.boxes(patches, b).astype(np.float32), on_object=obj,
            image_mass=mass["image"], text_mass=mass["text"], first_mass=mass["first"],
            query_token=display_token(vlm.tokenizer.convert_ids_to_tokens(
                int(ids[b, queries[b][0]]))),
            first_token=display_token(vlm.tokenizer.convert_ids_to_tokens(int(ids[b, first]))),
            answer=vlm.decode(torch.tensor([[predicted[b]]]))[0].strip(),
            prompt=q.prompt, target=sample.instances[target].name)
        _save_maps(maps_path(out.ensure(), sample.id), maps)
        mean = patch.mean(1)  # [L, N]: mean over heads
        total = mean.sum(-1, dtype=np.float64)
        on_obj = mean[:, obj].sum(-1, dtype=np.float64)
        peak = mean.argmax(-1)
        correct = None if config.setting == "generative" else bool(q.is_correct(maps.answer))
        for layer in range(vlm.num_layers):
            p = int(peak[layer])
            yield {
                "sample": sample.id, "target": maps.target, "prompt": q.prompt,
                "query": int(queries[b][0] - first), "query_token": maps.query_token,
                "first_token": maps.first_token, "answer": maps.answer, "correct": correct,
                "layer": layer,
                **{f"{m}_mass": float(mass[m][layer].mean()) for m in (*MASSES, "newline")},
                **{f"head_{m}_mass": mass[m][layer].astype(float).tolist() for m in MASSES},
                "object_mass": float(on_obj[layer]),
                "object_share": float(on_obj[layer] / total[layer]) if total[layer] > 0
                else None,
                "area_share": float(obj.mean()), "n_object_tokens": int(obj.sum()),
                "n_image_tokens": len(patches), "n_newline_tokens": len(newlines),
                "peak_tile": int(maps.tile[p]), "peak_row": int(maps.row[p]),
                "peak_col": int(maps.col[p]), "peak_on_object": bool(obj[p]),
            }


def _save_maps(path: Path, maps: AttentionMaps) -> None:
    """Written to a temporary name and renamed: a map file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **maps.arrays())
    os.replace(tmp, path)


def load_maps(path: Path) -> AttentionMaps:
    with np.load(path, allow_pickle=False) as z:
        return AttentionMaps.from_arrays({k: z[k] for k in z.files})


class ViewerPage(TypedDict):
    """One interactive attention page (`write_viewers`), captioned in the report."""

    path: str
    sample: str
    target: str
    prompt: str
    query_token: str
    answer: str


def write_viewers(vlm: ModelHandle, chosen, run_dir: Path) -> list[ViewerPage]:
    """Viewer pages of the first kept images, rebuilt from their map files (so a resumed
    run writes the same pages as an uninterrupted one)."""
    pages: list[ViewerPage] = []
    for sample, _ in chosen:
        src = maps_path(run_dir, sample.id)
        if not src.is_file():
            continue
        maps = load_maps(src)
        title = f"attention: {sample.id} ({maps.target}, {getattr(vlm, 'name', '')})"
        page = render_attention_viewer(sample.image, maps, title=title)
        path = write_page(run_dir / "viewer" / f"{src.stem}.html", page)
        pages.append({"path": str(path), "sample": sample.id, "target": maps.target,
                      "prompt": maps.prompt, "query_token": maps.query_token,
                      "answer": maps.answer})
    return pages


class AttentionSummary(TypedDict):
    """summary.json of `vislens attention` (what `execute` returns): `summarise`'s keys, then
    `run`'s (funnel) and `execute`'s (plot, object_plot; model set to the run's name). Read
    by report/sections.py `attention_section` and experiments/study.py `_headline`;
    tests/test_summary_contract.py checks both against these keys. Per-layer lists are
    means over images (None where no image has a value); shares are 0-1."""

    model: str
    setting: str
    query: str
    query_label: str  # "answer position" or "query 'WORD'"
    query_token: str | None  # the query's token text (most common over images)
    first_token: str
    has_newlines: bool  # row-newline tokens counted with the image
    n_images: int
    n_layers: int
    n_heads: int
    per_layer: dict[str, list[float | None]]  # "image" / "text" / "first" / "newline" mass
    per_layer_ci95: dict[str, list[list[float] | None]]  # MASSES -> bootstrap intervals
    object_share: list[float | None]  # the object's share of the image attention
    object_share_ci95: list[list[float] | None]
    area_share: list[float | None]  # the object's share of the image tokens
    object_lift: list[float | None]  # object_share / area_share
    peak_on_object: list[float | None]  # images whose most-attended patch is on the object
    peak_on_object_ci95: list[list[float] | None]
    peak_layer_image: int | None
    peak_layer_object: int | None
    answer_accuracy: Rate | None  # first answer token right
    viewers: list[ViewerPage]
    viewer: list[str]  # their paths
    config: dict[str, Any]
    funnel: Funnel
    plot: str  # attention_mass.png
    object_plot: str  # attention_object.png


def summarise(rows: list[dict], vlm, config: AttentionConfig, viewers: list[ViewerPage]) -> dict:
    """Per-layer means over images with bootstrap intervals (images resampled)."""
    n_layers = vlm.num_layers
    images = sorted({r["sample"] for r in rows})
    index = {s: i for i, s in enumerate(images)}

    def matrix(key: str) -> np.ndarray:
        m = np.full((len(images), n_layers), np.nan)
        for r in rows:
            v = r[key]
            m[index[r["sample"]], r["layer"]] = np.nan if v is None else float(v)
        return m

    def mean(m: np.ndarray) -> list[float | None]:
        return [float(np.nanmean(c)) if np.isfinite(c).any() else None for c in m.T]

    def ci(m: np.ndarray) -> list[list[float] | None]:
        return [None if not np.isfinite(lo) else [float(lo), float(hi)]
                for lo, hi in bootstrap_columns(m)]

    masses = {m: matrix(f"{m}_mass") for m in (*MASSES, "newline")}
    share, area = matrix("object_share"), matrix("area_share")
    per_layer = {m: mean(v) for m, v in masses.items()}
    object_share, area_share = mean(share), mean(area)
    peaks = [rate([r["peak_on_object"] for r in rows if r["layer"] == layer])
             for layer in range(n_layers)]
    first = rows[0] if rows else {}
    correct = [r["correct"] for r in rows if r["layer"] == 0 and r["correct"] is not None]
    lift = [None if s is None or not a else s / a for s, a in zip(object_share, area_share,
                                                                    strict=True)]
    return {
        "model": getattr(vlm, "name", ""),
        "setting": config.setting,
        "query": config.query,
        "query_label": "answer position" if parse_query(config.query) == ("index", -1)
        else f"query {config.query!r}",
        "query_token": Counter(r["query_token"] for r in rows).most_common(1)[0][0]
        if rows else None,
        "first_token": Counter(r["first_token"] for r in rows).most_common(1)[0][0]
        if rows else "",
        "has_newlines": bool(first.get("n_newline_tokens", 0)),
        "n_images": len(images),
        "n_layers": n_layers,
        "n_heads": len(first.get("head_image_mass", [])),
        "per_layer": per_layer,
        "per_layer_ci95": {m: ci(masses[m]) for m in MASSES},
        "object_share": object_share,
        "object_share_ci95": ci(share),
        "area_share": area_share,
        "object_lift": lift,
        "peak_on_object": [p["rate"] for p in peaks],
        "peak_on_object_ci95": [p["ci95"] for p in peaks],
        "peak_layer_image": _argmax(per_layer["image"]),
        "peak_layer_object": _argmax(lift),
        "answer_accuracy": rate(correct) if correct else None,
        "viewers": viewers,
        "viewer": [v["path"] for v in viewers],
        "config": asdict(config),
    }


def _argmax(values: list[float | None]) -> int | None:
    vals = [(v, i) for i, v in enumerate(values) if v is not None]
    return max(vals)[1] if vals else None
