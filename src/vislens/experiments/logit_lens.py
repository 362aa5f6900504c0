"""Neo et al. A2: do image tokens become words? The logit lens on every image token.

Residual streams are captured at image positions only, then decoded one
layer at a time (final norm applied once: index L is the last layer's output
BEFORE the norm, unlike HF's `hidden_states[-1]`), keeping only the top-k and
the class words' probabilities, so [layers x tokens x vocab] never exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vislens.data.samples import Sample
from vislens.distributed import executor
from vislens.experiments.runs import RunDir
from vislens.experiments.selection import choose_targets
from vislens.experiments.stats import wilson_ci
from vislens.interventions import capture
from vislens.report.plots import layer_curves
from vislens.report.viewer import LensToken, render_viewer

PROMPT = "describe this image ."
PAPER = {"hit_rate": 0.237, "peak_layer_mean": 25.7, "n_layers": 33}  # LLaVA-1.5-7B, COCO
MAX_LOGITS = 1 << 24  # logits decoded at once (64 MB in float32): rows per slice = this / vocab


@dataclass
class LensConfig:
    top_k: int = 5
    area: tuple[float, float] | None = None  # target area range (one large object)
    object_coverage: float = 0.5  # a patch is on the object when this much of it is covered
    viewers: int = 3  # interactive HTML pages for the first N kept images
    seed: int = 0
    batch_size: int = 4
    prompt: str = PROMPT


def word_ids(tokenizer, name: str) -> list[int]:
    """Token ids a class name can show up as: the piece each of its words starts with
    where the name is written, i.e. after a space, and (first word only) opening a text.

    A piece that is only whitespace starts no word: SentencePiece writes " giraffe" as
    "▁" then "▁g|ir|af|fe", and taking the bare "▁" made every "▁" in a top-k a hit
    for every class. Later words of a multi-word name never open a text, so their
    space-less spelling (byte-level "l" of "light" in "traffic light", a bare letter)
    is not one of the name's pieces either.
    """
    ids: set[int] = set()
    for k, word in enumerate(name.split()):
        for text in ((word, " " + word) if k == 0 else (" " + word,)):
            toks = tokenizer.encode(text, add_special_tokens=False)
            first = next((t for t in toks if tokenizer.decode([t]).strip()), None)
            if first is not None:
                ids.add(int(first))
    unk = tokenizer.unk_token_id
    return sorted(i for i in ids if i != unk)


def display_token(token: str | None) -> str:
    """A vocabulary entry as a word: sub-word space markers (SentencePiece, GPT-2) dropped."""
    token = token or ""
    return token.replace("\u2581", " ").replace("\u0120", " ").strip() or token


def execute(vlm, samples: list[Sample], config: LensConfig, out: Path, meta: dict,
            progress=None) -> dict:
    """Run into directory `out` (resuming), plot, and write summary.json."""
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    run_dir = RunDir(out, {"experiment": "logit-lens", **meta, **cfg}, key=["sample"])
    summary = run(vlm, samples, config, run_dir, progress)
    summary["model"] = meta.get("model", summary["model"])
    summary["plot"] = str(layer_curves(
        {"object patches": summary["per_layer"]}, run_dir.path / "logit_lens.png",
        f"Logit lens ({summary['model']}): object word in top-{config.top_k}",
        "share of object patches"))
    run_dir.write_summary(summary)
    return summary


def run(vlm, samples: list[Sample], config: LensConfig, out: RunDir, progress=None) -> dict:
    if not samples:
        raise ValueError("no samples for the logit lens; check --data / --n")
    vlm.require_layout("maps object masks to image tokens")
    rng = np.random.default_rng(config.seed)
    chosen = [(s, t) for s, t in zip(samples, choose_targets(samples, config.area, rng))
              if t is not None]
    todo = [(s, t) for s, t in chosen if not out.done(sample=s.id)]
    chunks = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    viewer_dir = out.path / "viewer"
    kept_ids = [s.id for s, _ in chosen]
    ex = executor(vlm)  # this process, or a vislens.distributed.RayPool: one unit per chunk
    ex.map(_chunk, chunks, config, viewer_dir, kept_ids, out=out, progress=progress,
           label="logit lens")
    return summarise(out.rows(), ex.info, config, viewer_dir)


def _chunk(vlm, out: RunDir, chunk, config: LensConfig, viewer_dir: Path, kept_ids: list[str]):
    for row in _chunk_rows(vlm, chunk, config, viewer_dir, kept_ids):
        out.add(row)


@torch.no_grad()
def _chunk_rows(vlm, chunk, config: LensConfig, viewer_dir: Path, kept_ids: list[str]):
    batch = vlm.prepare([s.image for s, _ in chunk], [config.prompt] * len(chunk))
    tm = batch.token_map
    positions = [tm.image_positions(b) for b in range(len(chunk))]
    with capture(vlm, positions, residual=True) as cap:
        vlm.forward(batch, logits_to_keep=1)
    vocab = [display_token(t) for t in
             vlm.tokenizer.convert_ids_to_tokens(list(range(len(vlm.tokenizer))))]
    for b, (sample, target) in enumerate(chunk):
        inst = sample.instances[target]
        pos, frac = tm.coverage(b, inst.mask)
        order = {int(p): i for i, p in enumerate(pos)}
        cover = np.array([frac[order[int(p)]] for p in positions[b]])
        background = np.ones(len(positions[b]), dtype=bool)
        for other in sample.instances:
            opos, ofrac = tm.coverage(b, other.mask)
            oorder = {int(p): i for i, p in enumerate(opos)}
            background &= np.array([ofrac[oorder[int(p)]] == 0 for p in positions[b]])
        cls = torch.tensor(word_ids(vlm.tokenizer, inst.name), dtype=torch.long)
        cells = tm.cells(positions[b], b)
        layers = [_decode(vlm, cap.of("residual", layer, b), cls, config.top_k)
                  for layer in range(vlm.num_layers + 1)]
        for t, p in enumerate(positions[b]):
            for layer, (ids, pr, cp, hit) in enumerate(layers):
                yield {"sample": sample.id, "target": inst.name, "position": int(p),
                       "row": int(cells[t, 1]), "col": int(cells[t, 2]), "tile": int(cells[t, 0]),
                       "layer": layer, "coverage": float(cover[t]),
                       "background": bool(background[t]),
                       "topk_ids": ids[t].tolist(), "topk_tokens": [vocab[i] for i in ids[t]],
                       "topk_probs": pr[t].tolist(), "class_prob": float(cp[t]),
                       "hit": bool(hit[t])}
        if sample.id in kept_ids[:config.viewers]:
            toks = [LensToken(position=int(p), row=int(cells[t, 1]), col=int(cells[t, 2]),
                              box=tuple(tm.boxes([p], b)[0]),
                              topk=[[(vocab[i], float(q)) for i, q in zip(ids[t], pr[t])]
                                    for ids, pr, _, _ in layers],
                              on_object=bool(cover[t] >= config.object_coverage))
                    for t, p in enumerate(positions[b])]
            page = render_viewer(sample.image, toks, title=f"logit lens: {sample.id} "
                                 f"({inst.name}, {vlm.name})", object_words=inst.name.split())
            viewer_dir.mkdir(parents=True, exist_ok=True)
            path = viewer_dir / f"{sample.id}.html"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(page)
            tmp.replace(path)


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


def summarise(rows: list[dict], vlm, config: LensConfig, viewer_dir: Path) -> dict:
    """Hit rate over object patches, best layer, per-layer curve, background false alarms."""
    n_layers = vlm.num_layers + 1
    tokens: dict[tuple, dict] = {}
    for r in rows:
        key = (r["sample"], r["position"])
        tok = tokens.setdefault(key, {"cover": r["coverage"], "bg": r["background"],
                                      "hit": np.zeros(n_layers, bool),
                                      "p": np.zeros(n_layers)})
        tok["hit"][r["layer"]] = r["hit"]
        tok["p"][r["layer"]] = r["class_prob"]
    obj = [t for t in tokens.values() if t["cover"] >= config.object_coverage]
    bg = [t for t in tokens.values() if t["bg"]]
    hits = [t for t in obj if t["hit"].any()]
    per_layer = [float(np.mean([t["hit"][layer] for t in obj])) if obj else 0.0
                 for layer in range(n_layers)]
    peak = [int(np.argmax(np.where(t["hit"], t["p"], -1.0))) for t in hits]
    n_bg_hits = sum(bool(t["hit"].any()) for t in bg)
    return {
        "model": getattr(vlm, "name", ""),
        "hit_rate": len(hits) / len(obj) if obj else 0.0,
        # patches of one image are not independent: the interval is a lower bound on the
        # real uncertainty (report n_images beside it)
        "hit_rate_ci95": list(wilson_ci(len(hits), len(obj))) if obj else None,
        "background_rate_ci95": list(wilson_ci(n_bg_hits, len(bg))) if bg else None,
        "peak_layer_mean": float(np.mean(peak)) if peak else None,
        "n_layers": n_layers,
        "per_layer": per_layer,
        "background_rate": n_bg_hits / len(bg) if bg else 0.0,
        "n_images": len({r["sample"] for r in rows}),
        "n_object_patches": len(obj),
        "n_background_patches": len(bg),
        "viewer": sorted(str(p) for p in viewer_dir.glob("*.html")),
        "paper": PAPER,
        "config": asdict(config),
    }
