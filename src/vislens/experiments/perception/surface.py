"""Liu et al. B4: information present in the image values but not surfaced.

On multiple-choice items (a reference image + candidates, BLINK style) two answers
are compared: the model's own, and a readout from image values (the candidate
whose mean image value is most cosine-similar to the reference's, per layer). The
readout's layer is chosen on a held-out half of the items (even indices) and both
are scored on the other half, so the layer choice never sees the scored items.

Several images for a one-image model: the model reads ONE composite image (a 2x2
grid: reference top-left, then the candidates in reading order, each cell the
first image's size); the readout encodes every image on its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from vislens.data.resolve import open_task
from vislens.experiments.perception import metrics as M
from vislens.experiments.perception.features import block_keys, extract
from vislens.experiments.perception.perceive import PROMPT

PAPER = {"blink-art-style": 0.333}  # share of items solved by the values, missed by the model


@dataclass
class SurfaceConfig:
    data: str = "shapesworld"
    n: int = 40
    kind: str = "fill"  # ShapesWorld attribute the items ask about (fill ~ "style")
    layers: tuple[int, ...] | None = None
    prompt: str = PROMPT  # prompt of the single-image readout passes
    max_new_tokens: int = 8
    batch_size: int = 8

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


def _letter_ids(tokenizer, n: int) -> list[list[int]] | None:
    """Token ids of each choice letter ("A", " A"), or None when letters are not tokens."""
    unk = tokenizer.unk_token_id
    out = []
    for c in range(n):
        letter = chr(ord("A") + c)
        ids = {tok[0] for text in (letter, " " + letter)
               if (tok := tokenizer.encode(text, add_special_tokens=False))}
        ids.discard(unk)
        out.append(sorted(ids))
    flat = [i for ids in out for i in ids]
    if any(not ids for ids in out) or len(flat) != len(set(flat)):
        return None
    return out


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


@torch.no_grad()
def model_answers(vlm, items, batch_size: int = 8, blocked: dict | None = None,
                  max_new_tokens: int = 8) -> list[dict]:
    """The model's choice per item: the best-scoring letter when letters are tokens,
    else its greedy answer parsed (None = no choice named, counted as wrong)."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = vlm.prepare([composite(it.images) for it in chunk],
                            [it.prompt() for it in chunk])
        letters = _letter_ids(vlm.tokenizer, max(len(it.choices) for it in chunk))
        with block_keys(vlm, batch, blocked):
            if letters is not None:
                logits = vlm.forward(batch, logits_to_keep=1).logits[:, -1].float()
                for b, it in enumerate(chunk):
                    scores = [float(logits[b, ids].max()) for ids in letters[:len(it.choices)]]
                    out.append({"choice": int(np.argmax(scores)), "text": "",
                                "mode": "letter-logits"})
            else:
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
                    sources=("values", "projector", "vision"), batch_size=config.batch_size)
    out = {}
    for src in feats[0].sources:
        means = np.stack([f.sources[src].mean(0).numpy() for f in feats])
        out[src] = int(M.cosine(means[1:], means[:1])[:, 0].argmax())
    return out


def run(vlm, config: SurfaceConfig, out, progress: Callable | None = None) -> dict:
    items = load_items(config)
    if len(items) < 2:
        raise ValueError("surface needs at least 2 items (half choose the layer); raise --n")
    todo = [(i, it) for i, it in enumerate(items) if not out.done(item=str(i))]
    chunks = [todo[k:k + config.batch_size] for k in range(0, len(todo), config.batch_size)]
    for chunk in (progress(chunks, "surface") if progress else chunks):
        answers = model_answers(vlm, [it for _, it in chunk], config.batch_size,
                                max_new_tokens=config.max_new_tokens)
        for (i, it), ans in zip(chunk, answers, strict=True):
            out.add({"item": str(i), "id": it.id, "truth": it.answer_index,
                     "model": -1 if ans["choice"] is None else ans["choice"],
                     "model_text": ans["text"], "mode": ans["mode"],
                     "readout": json.dumps(readout(vlm, it, config))})
        out.flush()
    return summarise(out.rows(), vlm.num_layers, config)


def summarise(rows: list[dict], num_layers: int, config: SurfaceConfig) -> dict:
    rows = sorted(rows, key=lambda r: int(r["item"]))
    held = [r for r in rows if int(r["item"]) % 2 == 0]
    scored = [r for r in rows if int(r["item"]) % 2 == 1] or held
    layers = list(range(num_layers)) if config.layers is None else list(config.layers)

    def acc(rs, src):
        return float(np.mean([json.loads(r["readout"])[src] == r["truth"] for r in rs]))

    per_layer = {ly: acc(held, f"values/{ly}") for ly in layers}
    best = max(per_layer, key=lambda ly: (per_layer[ly], -ly))
    src = f"values/{best}"
    values_ok = np.array([json.loads(r["readout"])[src] == r["truth"] for r in scored])
    model_ok = np.array([r["model"] == r["truth"] for r in scored])
    n = len(scored)
    counts = {"solved_by_values_not_model": int((values_ok & ~model_ok).sum()),
              "solved_by_model_not_values": int((~values_ok & model_ok).sum()),
              "both": int((values_ok & model_ok).sum()),
              "neither": int((~values_ok & ~model_ok).sum())}
    return {
        "n_items": len(rows), "n_scored": n, "n_heldout": len(held), "kind": config.kind,
        "best_layer": best, "heldout_values_accuracy": {str(k): round(v, 4)
                                                          for k, v in per_layer.items()},
        "values_accuracy": round(float(values_ok.mean()), 4),
        "model_accuracy": round(float(model_ok.mean()), 4),
        "model_unanswered": int(sum(r["model"] < 0 for r in scored)),
        "answer_mode": rows[0]["mode"] if rows else "",
        "projector_accuracy": round(acc(scored, "projector"), 4),
        "vision_accuracy": round(acc(scored, "vision"), 4),
        **counts,
        "present_not_surfaced": round(counts["solved_by_values_not_model"] / n, 4) if n else None,
        "paper": PAPER,
    }


def execute(vlm, config: SurfaceConfig, out, meta: dict, progress: Callable | None = None
            ) -> dict:
    """Run into directory `out` (resuming), plot, write summary.json."""
    from vislens.experiments.perception.plots import surface_plot
    from vislens.experiments.runs import RunDir

    run_dir = RunDir(out, {"experiment": "surface", **meta, **asdict(config)}, key=["item"])
    summary = run(vlm, config, run_dir, progress)
    summary["plot"] = str(surface_plot(summary, run_dir.path / "surface.png"))
    run_dir.write_summary(summary)
    return summary
