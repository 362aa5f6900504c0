"""Causal tracing on image tokens: where does the answer read the object?

Knockout blocks attention edges and asks whether the answer survives; patching asks the
converse: in a run whose image no longer holds the answer, which activations of the clean
run bring it back? (Meng et al.'s causal tracing, with clean / corrupted pairs whose
answers are two known words, as in Wang et al.'s logit-difference patching.)

Pairs. Each selected sample and target (`choose_targets`) gives a clean and a corrupted
image with the same prompt, so both runs line up column for column (patch.check_layout):
  color / shape  ShapesWorld only: the exact counterfactual scene (data.counterfactual),
                 the target's colour or shape changed and every other pixel the same.
                 The prompt is the VQA question of that attribute; the answer is the clean
                 word, the foil the changed scene's word.
  noise          Neo et al.'s object noise (selection.noise_object, seed = config.seed),
                 any data: the ShapesWorld colour question, or elsewhere the sample's VQA
                 question (prompts.asked) with its prefix and the answer's article ("It is
                 a"/"an"), so the next token is the class name. The foil is the corrupted
                 run's top token at the answer position.
A question must single the target out (the colour question names its shape, the shape
question its colour: no other object may share it), else the pair is not made.

Metric. LD = logit(answer) - logit(foil) at the answer position (the column after the
answer prefix, the last one), each word by its FIRST token in context (the token the
model would emit right after the prefix; a word split into pieces counts by its first,
where the model commits to it). A pair is kept when the clean argmax there is the
answer's token and the corrupted argmax is not (the funnel below counts each step).

Restored share = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt) per (site kind,
layer, token group), patch.restored_share: restoring nothing is 0 and restoring every
column of a layer's residual is 1 by construction (the clean logits come back); these are
the chance and ceiling lines, there is no other reference. A share can leave [0, 1]
(restoring part of a layer can overshoot or go the wrong way). Groups, on the clean
token map: object (tokens whose box meets the union of both targets' masks, or the
noised mask), object+1 (dilated by one token), rest-of-image (image minus object+1),
last image row, question words (knockout.question_columns) and the answer position.
A family without a token layout runs the question / answer-position groups only (by
positions; `groups` naming a pixel group there is refused in one line).

Computation (`Corrupted`): every group of one (kind, layer) is a row restoring its own
columns. Where the family's pass can be continued (continuation.record), the corrupted
pass is recorded once and rows run only from the site's layer and their first restored
column, grouped by that column (patch_continued, batching.start_groups); elsewhere
(Gemma 3, PaliGemma, Qwen3-VL) each row is a whole pass of one repeated batch (patch).
Both give the same numbers.

Per image token, at `token_layers`, for every site kind: attribution patching (one
backward pass for every token, patch.attribution) against exact patching of each image
token alone (one token per row); kept per pair, kind and layer: Spearman rank
correlation over image tokens, the overlap of the top k by each (k = object tokens, 5
without a layout or object token), and the share restored by patching the top k by
attribution together. Exact patching costs one row per token and layer: an image of more
than `exact_tokens` tokens (any-res families give thousands) is patched alone on that
many tokens evenly spaced in token order (NaN on the others; attribution still covers
all, and the top k by attribution is chosen among all). The first `maps` kept pairs are
drawn: a PNG per pair (maps/) and an interactive viewer (viewer/, render.patch_viewer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import torch

from vislens.data import counterfactual as cf
from vislens.data.samples import Question, Sample
from vislens.errors import VislensError
from vislens.experiments import funnel as funnel_steps
from vislens.experiments.batching import repeat_batch, start_groups
from vislens.experiments.knockout import question_columns
from vislens.experiments.prompts import asked
from vislens.experiments.selection import choose_targets, noise_object
from vislens.experiments.stats import bootstrap_ci, bootstrap_columns
from vislens.interventions.continuation import Recorded, record, refused
from vislens.interventions.patch import (
    KINDS,
    attribution,
    logit_difference,
    patch,
    patch_continued,
    record_sites,
    restored_share,
    site_grid,
)
from vislens.models.tokenmap import options_need_layout
from vislens.render.html import write_page
from vislens.render.plots import heatmap, save_figure
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor
from vislens.runs.rundir import RunDir

CORRUPTIONS = ("color", "shape", "noise")
GROUPS = ("object", "object+1", "rest-of-image", "last-row", "question", "answer-position")
LAYOUT_FREE_GROUPS = ("question", "answer-position")
FUNNEL_STEPS = ("read", "selected", "paired", "clean_correct", "corrupt_wrong", "kept")
TOP_K_DEFAULT = 5  # top-k tokens where the family has no layout or the object no token
COLUMNS = ("pair", "kind", "layer", "group", "target", "answer", "foil", "answer_id",
           "foil_id", "ld_clean", "ld_corrupt", "paired", "clean_correct", "corrupt_wrong",
           "kept", "prompt", "object_positions", "ld", "share", "n_positions", "positions", "exact",
           "estimate", "boxes", "tiles", "spearman", "k", "topk_overlap", "topk_restored")


def layer_list(spec: str, n_layers: int | None = None, name: str = "--layers") -> list[int]:
    """Layers from "all", "none", "auto" (4 evenly spaced) or a comma list of L and A-B
    items (0-based, inclusive); with n_layers, checked against the model's depth."""
    spec = str(spec).strip().lower()
    if spec in ("all", "auto", "none"):
        if n_layers is None or spec == "none":
            return []
        if spec == "all":
            return list(range(n_layers))
        return sorted({int(x) for x in np.linspace(0, n_layers - 1, min(4, n_layers)).round()})
    out: list[int] = []
    for item in (x.strip() for x in spec.split(",")):
        a, sep, b = item.partition("-")
        if not a.isdigit() or (sep and not b.isdigit()) or (sep and int(a) > int(b)):
            raise ValueError(f"{name} item {item!r} is none of all, auto, none, L or A-B "
                             "(0-based layers, A <= B)")
        out += range(int(a), int(b if sep else a) + 1)
    if n_layers is not None and out and max(out) >= n_layers:
        raise ValueError(f"{name} {spec}: this model has layers 0..{n_layers - 1}")
    return sorted(set(out))


@dataclass
class PatchConfig:
    corrupt: str = "color"  # color / shape (exact counterfactual, ShapesWorld) or noise
    kinds: tuple[str, ...] = ("residual",)
    groups: tuple[str, ...] = ()  # token groups restored (empty: every group the family maps)
    layers: str = "all"  # layer_list: the layers whose sites are restored group by group
    token_layers: str = "auto"  # per-image-token maps: 4 evenly spaced layers ("none": off)
    area: tuple[float, float] | None = None
    seed: int = 0  # the noise corruption's seed
    maps: int = 3  # per-token maps drawn for the first N kept pairs
    chunk: int = 64  # at most this many rows (column sets) per forward pass
    exact_tokens: int = 256  # at most this many image tokens patched one at a time

    def validate(self) -> None:
        """Every option checked before anything is loaded or written."""
        if self.corrupt not in CORRUPTIONS:
            raise ValueError(f"unknown --corrupt {self.corrupt!r}; choose from "
                             f"{', '.join(CORRUPTIONS)}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown --kinds {', '.join(bad) or '(none)'}; choose from "
                             f"{', '.join(KINDS)}")
        bad = [g for g in self.groups if g not in GROUPS]
        if bad:
            raise ValueError(f"unknown --groups {', '.join(bad)}; choose from {', '.join(GROUPS)}")
        if not layer_list(self.layers, None) and self.layers.strip().lower() == "none":
            raise ValueError("--layers none restores nothing; give all or a list of layers")
        layer_list(self.token_layers, None, "--token-layers")
        for name, value in (("--maps", self.maps), ("--chunk", self.chunk - 1),
                            ("--exact-tokens", self.exact_tokens - 2)):
            if value < 0:
                least = {"--maps": 0, "--chunk": 1, "--exact-tokens": 2}[name]
                raise ValueError(f"{name} must be at least {least}")


# ---- pairs --------------------------------------------------------------------------------
@dataclass
class Pair:
    """One clean / corrupted image pair with its question and the object's pixels."""

    clean: Any  # PIL image
    corrupt: Any
    question: Question
    prefix: str
    mask: np.ndarray
    foil: str | None  # None: the corrupted run's top token (noise)


def _unique(sample: Sample, target: int, attribute: str) -> bool:
    """The question about `attribute` names the target by its other attribute: no other
    object may share that one."""
    other = "shape" if attribute == "color" else "color"
    mine = sample.instances[target].attributes[other]
    return all(inst.attributes[other] != mine
               for i, inst in enumerate(sample.instances) if i != target)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def make_pair(vlm, sample: Sample, target: int, config: PatchConfig) -> Pair | None:
    """The pair of one sample and target, or None when there is none (funnel: paired)."""
    shapes = sample.meta.get("source") == "shapesworld"
    if config.corrupt in ("color", "shape"):
        if not _unique(sample, target, config.corrupt):
            return None
        made = cf.counterfactual(sample, target, config.corrupt)
        if made is None:
            return None
        q = made.question
        return Pair(sample.image, made.changed.image, q, q.answer_prefix or "",
                    made.object_mask(), made.foil)
    mask = sample.instances[target].mask
    if shapes:
        if not _unique(sample, target, "color"):
            return None
        q = cf.question_for(sample, target, "color")
        prefix = q.answer_prefix or ""
    else:
        q = asked(vlm, sample, target, "vqa")
        if q is None:
            return None
        prefix = f"{q.answer_prefix} {_article(q.answer)}"
    return Pair(sample.image, corrupted_image(sample, target, config), q, prefix, mask, None)


def corrupted_image(sample: Sample, target: int, config: PatchConfig):
    """The corrupted image of a pair (None where the counterfactual cannot be drawn): what
    make_pair runs on and the viewer shows."""
    if config.corrupt == "noise":
        return noise_object(sample.image, sample.instances[target].mask, config.seed)
    made = cf.counterfactual(sample, target, config.corrupt)
    return None if made is None else made.changed.image


def first_token(vlm, prompt: str, prefix: str, word: str) -> int | None:
    """The word's first token where the model would write it, right after the prefix: the
    first id where the rendered prompt with `prefix + " " + word` departs from the one
    with `prefix` alone (None where the word's tokens would change the prefix's)."""
    def ids(answer_prefix: str) -> list[int]:
        text = vlm.chat_text(prompt, answer_prefix)
        return vlm.tokenizer(text, add_special_tokens=False)["input_ids"]

    base, full = ids(prefix), ids(f"{prefix} {word}")
    if len(full) <= len(base) or full[:len(base)] != base:
        return None
    return int(full[len(base)])


def check_groups(vlm: ModelHandle, wanted: tuple[str, ...]) -> None:
    """On a family without a layout only the layout-free groups run: both by default, and a
    group asked for by name that needs pixels is one clear line, before any work."""
    bad = [g for g in wanted if g not in LAYOUT_FREE_GROUPS]
    if bad and not vlm.family.geometric:
        raise options_need_layout(vlm.model_type, f"patch groups {', '.join(bad)}",
                                  "leave out --groups (question and answer-position run, by "
                                  "positions)")


def groups(vlm, batch, pair: Pair) -> dict[str, np.ndarray]:
    """Token columns of each group of one (clean) batch of one sample."""
    tm = batch.token_map
    answer = np.asarray([batch.seq_len - 1], dtype=np.int64)
    question = question_columns(vlm.tokenizer, batch, 0, pair.question.prompt)
    if not tm.geometric:
        return {"question": question, "answer-position": answer}
    obj = tm.positions(0, pair.mask)
    obj1 = tm.dilate(obj, 1, 0)
    image = tm.image_positions(0)
    return {"object": obj, "object+1": obj1, "rest-of-image": np.setdiff1d(image, obj1),
            "last-row": tm.last_row(0), "question": question, "answer-position": answer}


# ---- run ----------------------------------------------------------------------------------
def execute(vlm: ModelHandle, samples: list[Sample], config: PatchConfig, out: Path, meta: dict,
            progress=None) -> PatchSummary:
    """Run into directory `out` (resuming), plot, and write summary.json."""
    config.validate()
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    run_dir = RunDir(out, {"experiment": "patch", **meta, **cfg},
                     key=["pair", "kind", "layer", "group"])
    summary = cast(PatchSummary, run(vlm, samples, config, run_dir, progress))
    summary["model"] = meta.get("model", "")
    summary["plots"] = {}
    for kind, by_group in summary["restored"].items():
        names = list(by_group)
        if not names:  # no pair kept: the funnel says why
            continue
        summary["plots"][kind] = str(heatmap(
            [by_group[g]["mean"] for g in names], names,
            [str(x) for x in summary["layers"]], run_dir.path / f"patch_{kind}.png",
            f"Causal tracing ({summary['model']}, {kind}): share of the logit difference "
            f"restored, {summary['n_pairs']} pairs", "restored share (0 none, 1 all)"))
    drawn = _drawn(run_dir, samples, config) if config.maps and summary["attribution"] else {}
    summary["maps"] = [str(p) for p in _draw_maps(run_dir, config, drawn)]
    summary["viewers"] = [str(p) for p in _write_viewers(run_dir, samples, config, drawn,
                                                         summary["model"])]
    run_dir.write_summary(summary)
    return summary


def run(vlm: ModelHandle, samples: list[Sample], config: PatchConfig, out: RunDir,
        progress=None) -> dict:
    if not samples:
        raise ValueError("no samples for patch; check --data / --n")
    config.validate()
    check_groups(vlm, config.groups)
    if config.corrupt != "noise":
        other = [s.id for s in samples if s.meta.get("source") != "shapesworld"]
        if other:
            raise VislensError(f"--corrupt {config.corrupt} redraws ShapesWorld scenes exactly; "
                               f"{other[0]!r} is not one: use --corrupt noise for other data")
    ex = executor(vlm)
    n_layers = ex.info.num_layers
    layers = layer_list(config.layers, n_layers)
    token_layers = layer_list(config.token_layers, n_layers, "--token-layers")
    targets = choose_targets(samples, config.area)
    items = [(s, t) for s, t in zip(samples, targets) if t is not None
             and not out.done(pair=s.id, kind="pair", layer=-1, group="")]
    ex.map(_unit, items, config, layers, token_layers, out=out, progress=progress,
           label="patch")
    rows = out.rows()
    summary = summarise(rows, config, layers, token_layers, n_layers)
    summary["funnel"] = tally(samples, targets, rows, config.corrupt)
    return summary


def tally(samples, targets, rows: list[dict], corrupt: str) -> funnel_steps.Funnel:
    """The funnel of a patch run: FUNNEL_STEPS, under the corruption's name."""
    pairs = [r for r in rows if r["kind"] == "pair"]
    counts: dict[str, int | None] = {
        "read": funnel_steps.images_read(samples),
        "selected": sum(t is not None for t in targets),
        "paired": sum(bool(r["paired"]) for r in pairs),
        "clean_correct": sum(bool(r["clean_correct"]) for r in pairs),
        "corrupt_wrong": sum(bool(r["clean_correct"] and r["corrupt_wrong"]) for r in pairs),
        "kept": sum(bool(r["kept"]) for r in pairs)}
    lost = {}
    if not counts["kept"]:
        step = next(s for s in FUNNEL_STEPS[1:] if not counts[s])
        why = {"selected": "no image has a target alone in its class (--area, --n)",
               "paired": "no target could be changed without touching another object, or no "
                         "question named it alone: read more images with --n",
               "clean_correct": "the model answers none right clean: try another --model",
               "corrupt_wrong": "the corruption never changed the answer: try another "
                                "--corrupt", "kept": "nothing was kept"}[step]
        lost[corrupt] = (f"{corrupt}: no pair kept; lost at the step "
                         f"'{funnel_steps.LABELS[step]}': {why}")
    return {"steps": list(FUNNEL_STEPS), "counts": {corrupt: counts}, "lost": lost}


def _row(**values) -> dict:
    """A row with every column (parquet parts must agree on them)."""
    return {**dict.fromkeys(COLUMNS), **values}


def _unit(vlm, out: RunDir, item: tuple[Sample, int], config: PatchConfig, layers: list[int],
          token_layers: list[int]) -> None:
    """Every row of one pair; the pair row last, so a unit cut short is redone whole."""
    sample, target = item
    rows = pair_rows(vlm, sample, target, config, layers, token_layers)
    for row in rows[1:] + rows[:1]:
        out.add(row)


@dataclass
class Corrupted:
    """The corrupted run of one pair and the clean activations to patch into it.

    Where the family allows (continuation.record is reusable), the corrupted pass is
    recorded once and each patch runs only from its site's layer and its first restored
    column (patch_continued); elsewhere every patch is a whole pass (patch). Both give the
    same numbers (tests/test_patching.py checks patch_continued against patch)."""

    vlm: Any
    source: Any  # record_sites of the clean batch
    batch: Any  # the corrupted one-row Batch
    feats: Any  # its image features (one vision pass)
    recorded: Recorded | None
    metric: Any
    chunk: int

    @classmethod
    def of(cls, vlm, source, batch, layers: list[int], chunk: int) -> Corrupted:
        """Its one vision pass and, where the family allows, its recording (the residual
        entering each of `layers` kept)."""
        feats = vlm.image_embeddings(batch)
        recorded = None
        if not refused(vlm):
            rec = record(vlm, batch, feats, residual_layers=layers)
            recorded = rec if rec.reusable else None
        return cls(vlm, source, batch, feats, recorded, None, chunk)

    @torch.no_grad()
    def last_logits(self) -> torch.Tensor:
        if self.recorded is not None:
            return self.recorded.logits[:, -1].float()
        return self.vlm.forward(self.batch, image_features=self.feats,
                                logits_to_keep=1).logits[:, -1].float()

    def lds(self, kind: str, layer: int, sets: list) -> torch.Tensor:
        """The metric with each column set alone of the clean run restored at (kind, layer)."""
        out = torch.empty(len(sets), dtype=torch.float64)
        for rows, logits in self._passes(kind, layer, sets):
            out[rows] = self.metric(logits.float()).double().cpu()
        return out

    def logits(self, kind: str, layer: int, sets: list) -> torch.Tensor:
        """[len(sets), vocab] last-position logits (float32), each column set alone of the
        clean run restored at (kind, layer)."""
        parts = list(self._passes(kind, layer, sets))
        out = torch.empty(len(sets), parts[0][1].shape[-1])
        for rows, logits in parts:
            out[rows] = logits[:, -1].float().cpu()
        return out

    @torch.no_grad()
    def _passes(self, kind: str, layer: int, sets: list):
        """(row indices, logits) of each pass the sets take: chunks of whole passes, or rows
        grouped by their first restored column, continued from the recording."""
        if self.recorded is None:
            chunks = [list(range(a, min(a + self.chunk, len(sets))))
                      for a in range(0, len(sets), self.chunk)]
        else:
            end = self.batch.seq_len
            chunks = start_groups([int(np.min(c)) if len(c) else end - 1 for c in sets], end,
                                  max_rows=self.chunk)
        for rows in chunks:
            part = [sets[i] for i in rows]
            if self.recorded is not None:
                logits = patch_continued(self.vlm, self.source, self.batch, self.recorded,
                                         (kind, layer), part)
            else:
                batch = repeat_batch(self.batch, len(part))
                injected = True if self.vlm.family.deepstack else None
                with patch(self.vlm, self.source.select([0] * len(part)), batch,
                           [(kind, layer)], part, injected=injected):
                    logits = self.vlm.forward(batch, image_features=self.feats * len(part),
                                              logits_to_keep=1).logits
            yield rows, logits


def pair_rows(vlm, sample: Sample, target: int, config: PatchConfig, layers: list[int],
              token_layers: list[int]) -> list[dict]:
    """The pair row first, then its group rows and token rows (none when not kept)."""
    base = {"pair": sample.id, "target": sample.instances[target].name}
    head = _row(**base, kind="pair", layer=-1, group="", paired=False, clean_correct=False,
                corrupt_wrong=False, kept=False)
    pair = make_pair(vlm, sample, target, config)
    if pair is None:
        return [head]
    q = pair.question
    answer_id = first_token(vlm, q.prompt, pair.prefix, q.answer)
    foil_id = None if pair.foil is None else first_token(vlm, q.prompt, pair.prefix, pair.foil)
    if answer_id is None or (pair.foil is not None and foil_id is None):
        return [head]
    clean = vlm.prepare([pair.clean], [q.prompt], [pair.prefix])
    corrupt = vlm.prepare([pair.corrupt], [q.prompt], [pair.prefix])
    kinds = list(config.kinds)
    needed = sorted(set(layers) | set(token_layers))
    source = record_sites(vlm, clean, site_grid(kinds, needed), logits_to_keep=1)
    clean_logits = source.logits[:, -1].float()
    corrupted = Corrupted.of(vlm, source, corrupt, needed, config.chunk)
    corrupt_logits = corrupted.last_logits()
    clean_top, corrupt_top = int(clean_logits[0].argmax()), int(corrupt_logits[0].argmax())
    if foil_id is None:
        foil_id = corrupt_top
    foil_word = pair.foil if pair.foil is not None else vlm.decode(torch.tensor([[foil_id]]))[0]
    metric = corrupted.metric = logit_difference(answer_id, foil_id)
    ld_clean, ld_corrupt = float(metric(clean_logits[:, None])), float(
        metric(corrupt_logits[:, None]))
    head.update(paired=True, prompt=q.prompt, answer=q.answer, foil=foil_word.strip(),
                answer_id=answer_id, foil_id=foil_id, ld_clean=ld_clean, ld_corrupt=ld_corrupt,
                clean_correct=clean_top == answer_id, corrupt_wrong=corrupt_top != answer_id)
    head["kept"] = bool(head["clean_correct"] and head["corrupt_wrong"]
                        and ld_clean != ld_corrupt)
    if not head["kept"]:
        return [head]
    cols = groups(vlm, clean, pair)
    if "object" in cols:
        head["object_positions"] = cols["object"].tolist()
    names = [g for g in cols if not config.groups or g in config.groups]
    rows = [head]
    for kind in kinds:
        for layer in layers:
            lds = corrupted.lds(kind, layer, [cols[g] for g in names])
            shares = restored_share(lds, ld_clean, ld_corrupt)
            for g, ld, share in zip(names, lds.tolist(), shares.tolist()):
                rows.append(_row(**base, kind=kind, layer=layer, group=g, ld=ld, share=share,
                                 n_positions=len(cols[g])))
    if token_layers:
        rows += token_rows(base, corrupted, token_layers, cols.get("object"), config,
                           ld_clean, ld_corrupt)
    return rows


def evenly(n: int, at_most: int) -> np.ndarray:
    """Indices of at most `at_most` of n items, evenly spaced, first and last included."""
    return np.arange(n) if n <= at_most else \
        np.unique(np.linspace(0, n - 1, at_most).round().astype(np.int64))


def token_rows(base: dict, corrupted: Corrupted, token_layers: list[int],
               obj: np.ndarray | None, config: PatchConfig, ld_clean: float, ld_corrupt: float
               ) -> list[dict]:
    """Attribution vs exact patching of each image token, per site kind and token layer:
    attribution for every image token (one backward pass for all), exact patching of each
    token alone on `exact_tokens` evenly spaced ones (NaN on the others)."""
    from scipy.stats import spearmanr

    every = corrupted.batch.token_map.image_positions(0)
    chosen = evenly(len(every), config.exact_tokens)
    image = every[chosen]
    att = attribution(corrupted.vlm, corrupted.source, corrupted.batch, corrupted.metric,
                      layers=token_layers, kinds=config.kinds)
    gap = ld_clean - ld_corrupt
    k = int(len(obj)) if obj is not None and len(obj) else TOP_K_DEFAULT
    k = min(k, len(image))
    tm = corrupted.batch.token_map  # the clean run's layout too (check_layout)
    boxes = tm.boxes(every, 0).astype(float).ravel().tolist() if tm.geometric else None
    tiles = tm.cells(every, 0)[:, 0].tolist() if tm.geometric else None
    rows = []
    for kind in config.kinds:
        for i, layer in enumerate(token_layers):
            estimate = att.effects[kind][0, i].double().numpy()[every] / gap
            top = every[np.argsort(-estimate, kind="stable")[:k]]
            sets = [[c] for c in image] + [top]  # each token alone, then the top k together
            shares = restored_share(corrupted.lds(kind, layer, sets), ld_clean,
                                    ld_corrupt).numpy()
            exact = np.full(len(every), np.nan)
            exact[chosen] = shares[:-1]
            top_exact = set(image[np.argsort(-shares[:-1], kind="stable")[:k]].tolist())
            top_estimate = set(image[np.argsort(-estimate[chosen], kind="stable")[:k]].tolist())
            # undefined (NaN, left out of the means) where either side is constant, e.g.
            # a last-layer MLP, which no later column reads
            varies = len(image) > 1 and np.ptp(estimate[chosen]) > 0 and np.ptp(shares[:-1]) > 0
            rho = float(spearmanr(estimate[chosen], shares[:-1]).statistic) if varies \
                else float("nan")
            rows.append(_row(**base, kind="token", layer=layer, group=kind,
                             positions=every.tolist(), boxes=boxes, tiles=tiles,
                             exact=exact.tolist(), estimate=estimate.tolist(), spearman=rho,
                             k=k, topk_overlap=len(top_exact & top_estimate) / k,
                             topk_restored=float(shares[-1])))
    return rows


# ---- summary ------------------------------------------------------------------------------
class Curve(TypedDict):
    """A per-layer curve: the mean over kept pairs and its bootstrap interval (over pairs)."""

    mean: list[float | None]
    ci95: list[list[float] | None]


class TokenLayer(TypedDict):
    """Attribution vs exact patching of single image tokens at one layer, over kept pairs."""

    spearman: float | None  # mean over pairs of Spearman's rho over image tokens
    spearman_ci95: list[float] | None  # bootstrap over pairs
    topk_overlap: float | None  # mean share of the top k (by exact) that attribution finds
    topk_restored: float | None  # mean share restored by the top k by attribution, together
    topk_restored_ci95: list[float] | None
    n: int  # pairs


class PatchSummary(TypedDict):
    """summary.json of `vislens patch` (what `execute` returns): `summarise`'s keys, then
    `run`'s (funnel) and `execute`'s (model, plots, maps). Read by report/sections.py
    `patch_section` and experiments/study.py `_headline`. Shares: 0 = nothing restored
    (the corrupted run), 1 = all of it (the clean run), by construction."""

    layers: list[int]  # the layers of every curve
    groups: list[str]  # the token groups, in order
    restored: dict[str, dict[str, Curve]]  # kind -> group -> per layer
    n_positions: dict[str, float | None]  # group -> mean number of columns over kept pairs
    n_pairs: int  # pairs kept (the funnel's last step)
    ld_clean: float | None  # mean LD of the clean runs
    ld_corrupt: float | None  # mean LD of the corrupted runs
    attribution: dict[str, dict[str, TokenLayer]]  # site kind -> token layer (a string) -> ...
    corrupt: str  # color / shape / noise
    reference: dict[str, float]  # {"nothing": 0.0, "everything": 1.0}
    config: dict[str, Any]
    funnel: funnel_steps.Funnel
    model: str
    plots: dict[str, str]  # kind -> layer x group heatmap (patch_<kind>.png)
    maps: list[str]  # per-token maps of the first kept pairs (maps/<pair>.png)
    viewers: list[str]  # the same as interactive pages (viewer/<pair>.html)


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def _ci(values) -> list[float] | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return list(bootstrap_ci(v)) if v else None


def summarise(rows: list[dict], config: PatchConfig, layers: list[int],
              token_layers: list[int], n_layers: int | None = None) -> dict:
    """Mean restored share per (kind, group, layer) over kept pairs with bootstrap
    intervals (pairs resampled together across layers), and the token comparison."""
    kept = sorted(r["pair"] for r in rows if r["kind"] == "pair" and r["kept"])
    present = {r["group"] for r in rows if r["kind"] in config.kinds}
    names = [g for g in GROUPS if g in present]
    index = {(r["pair"], r["kind"], r["layer"], r["group"]): r for r in rows}
    restored: dict[str, dict[str, Curve]] = {}
    for kind in config.kinds:
        restored[kind] = {}
        for g in names:
            matrix = np.array([[index[(p, kind, x, g)]["share"] if (p, kind, x, g) in index
                                else np.nan for x in layers] for p in kept], dtype=float)
            matrix = matrix.reshape(len(kept), len(layers))
            ci = bootstrap_columns(matrix)
            restored[kind][g] = {
                "mean": [_mean(matrix[:, j]) for j in range(len(layers))],
                "ci95": [None if np.isnan(ci[j]).any() else [float(ci[j, 0]), float(ci[j, 1])]
                         for j in range(len(layers))]}
    tokens = [r for r in rows if r["kind"] == "token"]
    att: dict[str, dict[str, TokenLayer]] = {kind: {} for kind in config.kinds} \
        if token_layers else {}
    for kind in att:
        for x in token_layers:
            at = [r for r in tokens if r["layer"] == x and r["group"] == kind]
            att[kind][str(x)] = {"spearman": _mean(r["spearman"] for r in at),
                                 "spearman_ci95": _ci([r["spearman"] for r in at]),
                                 "topk_overlap": _mean(r["topk_overlap"] for r in at),
                                 "topk_restored": _mean(r["topk_restored"] for r in at),
                                 "topk_restored_ci95": _ci([r["topk_restored"] for r in at]),
                                 "n": len(at)}
    group_rows = [r for r in rows if r["kind"] in config.kinds and r["layer"] == layers[0]] \
        if layers else []
    pairs = [r for r in rows if r["kind"] == "pair" and r["kept"]]
    return {
        "layers": list(layers), "groups": names, "restored": restored,
        "n_positions": {g: _mean(r["n_positions"] for r in group_rows if r["group"] == g
                                 and r["kind"] == config.kinds[0]) for g in names},
        "n_pairs": len(kept),
        "ld_clean": _mean(r["ld_clean"] for r in pairs),
        "ld_corrupt": _mean(r["ld_corrupt"] for r in pairs),
        "attribution": att, "corrupt": config.corrupt,
        "reference": {"nothing": 0.0, "everything": 1.0},
        "config": asdict(config),
    }


# ---- per-token maps ---------------------------------------------------------------------------
def _drawn(run_dir: RunDir, samples: list[Sample], config: PatchConfig
           ) -> dict[str, dict[str, Any]]:
    """The first `config.maps` kept pairs whose family has a token layout (their token rows
    carry each token's pixel box): pair -> its pair row, group rows and token rows."""
    by_id = {s.id: s for s in samples}
    rows = run_dir.rows()
    keep = sorted({r["pair"] for r in rows if r["kind"] == "token" and r["boxes"]
                   and r["pair"] in by_id})[:config.maps]
    out: dict[str, dict[str, Any]] = {p: {"sample": by_id[p], "groups": [], "tokens": []}
                                      for p in keep}
    for r in rows:
        if r["pair"] not in out:
            continue
        if r["kind"] == "pair":
            out[r["pair"]]["pair"] = r
        else:
            out[r["pair"]]["tokens" if r["kind"] == "token" else "groups"].append(r)
    for d in out.values():
        d["tokens"].sort(key=lambda r: (list(config.kinds).index(r["group"]), r["layer"]))
    return out


def _draw_maps(run_dir: RunDir, config: PatchConfig, drawn: dict[str, dict[str, Any]]
               ) -> list[Path]:
    """Exact and attribution shares of single image tokens drawn on the clean image, one
    figure per pair (a row per site kind and token layer, its own symmetric colour scale;
    finer tokens drawn over coarser ones where views overlap)."""
    import matplotlib.pyplot as plt

    paths = []
    for pair, d in drawn.items():
        image = np.asarray(d["sample"].image.convert("RGB"))
        at = d["tokens"]
        fig, axes = plt.subplots(len(at), 2, figsize=(7, 3.3 * len(at)), squeeze=False)
        for i, r in enumerate(at):
            boxes = np.asarray(r["boxes"], dtype=float).reshape(-1, 4)
            order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                               kind="stable")
            values = [np.asarray(r["exact"], dtype=float), np.asarray(r["estimate"], dtype=float)]
            top = max(float(np.nanmax(np.abs(v), initial=0.0)) for v in values) or 1.0
            for j, (what, v) in enumerate(zip(("exact", "attribution"), values, strict=True)):
                overlay = np.full(image.shape[:2], np.nan)
                for t in order:
                    if np.isfinite(v[t]):
                        x0, y0, x1, y1 = boxes[t]
                        overlay[max(0, int(y0)):int(np.ceil(y1)),
                                max(0, int(x0)):int(np.ceil(x1))] = v[t]
                ax = axes[i, j]
                ax.imshow(image)
                im = ax.imshow(overlay, cmap="coolwarm", alpha=0.6, vmin=-top, vmax=top)
                ax.set_title(f"{r['group']}, layer {r['layer']}: {what}", fontsize=10)
                ax.axis("off")
            fig.colorbar(im, ax=axes[i].tolist(), label="share restored by one token")
        fig.suptitle(f"{pair}: single image tokens restored")
        paths.append(save_figure(fig, run_dir.path / "maps" / f"{pair}.png"))
    return paths


def _write_viewers(run_dir: RunDir, samples: list[Sample], config: PatchConfig,
                   drawn: dict[str, dict[str, Any]], model: str) -> list[Path]:
    """One interactive page per drawn pair (render.patch_viewer), written whole or not at
    all."""
    from vislens.render.patch_viewer import TokenEffects, render_patch_viewer

    targets = dict(zip([s.id for s in samples], choose_targets(samples, config.area),
                       strict=True))
    paths = []
    for pair, d in drawn.items():
        sample, head, at = d["sample"], d["pair"], d["tokens"]
        corrupt = corrupted_image(sample, targets[pair], config)
        positions = at[0]["positions"]
        obj = set(head["object_positions"] or ())
        effects = [TokenEffects(r["group"], r["layer"],
                                [None if x is None or not np.isfinite(x) else x
                                 for x in r["exact"]], r["estimate"], r["spearman"],
                                r["topk_overlap"], r["topk_restored"], r["k"]) for r in at]
        layers = sorted({r["layer"] for r in d["groups"]})
        share = {(r["group"], r["kind"], r["layer"]): r["share"] for r in d["groups"]}
        names = [g for g in GROUPS if any(r["group"] == g for r in d["groups"])]
        tables = [(kind, layers, {g: [share.get((g, kind, x)) for x in layers] for g in names})
                  for kind in config.kinds]
        lead = (f"{model}: “{head['prompt']}”, answer “{head['answer']}” "
                f"against “{head['foil']}”; right on the clean image, wrong on the "
                f"corrupted one ({config.corrupt}). Logit difference (answer − foil, "
                f"first tokens) {head['ld_clean']:.3f} clean, {head['ld_corrupt']:.3f} "
                "corrupted.")
        html = render_patch_viewer(
            sample.image, corrupt, np.asarray(at[0]["boxes"], dtype=float).reshape(-1, 4),
            at[0]["tiles"], positions, [p in obj for p in positions], effects, tables,
            title=f"causal tracing: {pair} ({sample.instances[targets[pair]].name})", lead=lead)
        paths.append(write_page(run_dir.path / "viewer" / f"{pair}.html", html))
    return paths
