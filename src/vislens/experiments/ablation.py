"""Neo et al. A1: which image tokens carry an object? Ablate them and see the answer break.

Per kept sample and setting, every condition replaces the LM input
embeddings of one token set with the ablation vector (mean post-projector
image embedding over a reference set that is never the evaluated images, or
zeros) and re-asks the question; the metric is the % of initially-correct
samples that become incorrect. Integrated gradients run as Neo et al. ran them:
once per image on the polling question, 50 steps, tokens ranked by |IG| summed
over the hidden dimensions, the ranking shared by the three settings. All conditions of a sample
run as one batch over one vision pass. Where the LM also adds image features
inside its first layers (Qwen3-VL's DeepStack), those are replaced at the same
tokens, by their reference means (or zeros): ablating a token removes all the
image puts there.

Nothing is computed twice where the LM's recorded pass can be continued (see `_shared_rows`;
otherwise `_full_rows`, the plain generate-under-ablate path): the settings share the image
prefix, a condition runs from its first ablated token, and a condition row stops decoding
once its verdict is settled (`Question.settled`), so a condition row's "text" is the
generation up to where it stopped (its verdict is the full generation's). Clean and noised
rows decode in full, as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.data.samples import Question, Sample
from vislens.errors import VislensError
from vislens.experiments import decoding, funnel
from vislens.experiments.batching import cut_batch, extend_batch, repeat_batch, start_groups
from vislens.experiments.funnel import Funnel
from vislens.experiments.prompts import MAX_NEW_TOKENS, answer_span, asked, question
from vislens.experiments.selection import choose_targets, noise_object
from vislens.experiments.stats import wilson_ci
from vislens.interventions import ablate, mean_image_embedding, mean_injected_features
from vislens.interventions.continuation import (
    Recorded,
    Rows,
    SharedPrefixLayer,
    advance,
    embed,
    record,
    refused,
)
from vislens.interventions.reference import overlap
from vislens.models.tokenmap import options_need_layout
from vislens.models.vlm import ImageEmbeddings
from vislens.render.plots import grouped_bars
from vislens.runs.handle import ModelHandle
from vislens.runs.local import executor
from vislens.runs.rundir import RunDir

RANDOM_KS = (5, 10, 20, 40, 60, 100, 250)
FIXED_CONDITIONS = ("object", "object+1", "object+2", "register", "random-matched",
                    "ig-matched", "all-but-object+1")
SETTINGS = ("generative", "polling", "vqa")
IG_SIGNS = ("abs", "signed")
IG_PROMPTS = ("polling", "own")
REFERENCE_N = 100  # ShapesWorld scenes in the default (held-out) mean-vector reference set
PAPER = {  # Neo et al. 2024, LLaVA-1.5-7B, % of correct samples that become incorrect
    "generative": {"object": 33, "object+1": 72, "random-40": 2},
    "polling": {"object": 15, "object+1": 51, "random-40": 0},
    "vqa": {"object": 33, "object+1": 87, "random-40": 0},
}


@dataclass
class AblationConfig:
    settings: Sequence[str] = SETTINGS
    conditions: Sequence[str] | None = None  # None = every condition
    random_ks: Sequence[int] = RANDOM_KS
    vector: str = "mean"  # "mean" | "zeros"
    area: tuple[float, float] | None = None  # target area range in original pixels
    ig_steps: int = 50  # Neo et al.: 50
    ig_sign: str = "abs"  # rank by "abs": |IG| summed over hidden dims (Neo) | "signed": sum
    ig_prompt: str = "polling"  # "polling": one IG per image on the polling question, shared
    # by the settings (Neo) | "own": each setting's own prompt and answer word
    ig_batch: int = 0  # IG steps per forward + backward pass; 0 = what the memory budget holds
    # mean-vector images, a data spec (imagenet:DIR, shapesworld:SEED, ...); "" = a held-out
    # set disjoint from the evaluated images (resolve_reference), never the evaluated ones
    reference: str = ""
    seed: int = 0
    max_new_tokens: dict[str, int] = field(default_factory=lambda: dict(MAX_NEW_TOKENS))

    def validate(self) -> None:
        """Every option checked before anything is loaded or written."""
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise ValueError(f"unknown setting(s) {', '.join(bad) or '(none)'}; choose from "
                             f"{', '.join(SETTINGS)}")
        if self.conditions is not None:
            unknown = set(self.conditions) - set(FIXED_CONDITIONS) - {
                f"random-{k}" for k in self.random_ks}
            if unknown:
                raise ValueError(f"unknown ablation conditions {sorted(unknown)}; choose from "
                                 f"{', '.join(FIXED_CONDITIONS)}, random-K with K in "
                                 f"{', '.join(map(str, self.random_ks))}")
        if self.vector not in ("mean", "zeros"):
            raise ValueError(f"unknown ablation vector {self.vector!r}; choose mean or zeros")
        if self.ig_steps < 1:
            raise ValueError("--ig-steps must be at least 1")
        if self.ig_batch < 0:
            raise ValueError("--ig-batch must be 0 (fit the memory budget) or at least 1")
        if self.ig_sign not in IG_SIGNS:
            raise ValueError(f"unknown --ig-sign {self.ig_sign!r}; choose {' or '.join(IG_SIGNS)}")
        if self.ig_prompt not in IG_PROMPTS:
            raise ValueError(f"unknown --ig-prompt {self.ig_prompt!r}; choose "
                             f"{' or '.join(IG_PROMPTS)}")

    def condition_names(self, n_image_tokens: int) -> list[str]:
        self.validate()
        names = list(FIXED_CONDITIONS) + [f"random-{k}" for k in self.random_ks
                                          if k <= n_image_tokens]
        if self.conditions is not None:
            names = [c for c in names if c in self.conditions]
        return names


def execute(vlm: ModelHandle, samples: list[Sample], config: AblationConfig, out: Path, meta: dict,
            reference_images=None, progress=None) -> AblationSummary:
    """Run into directory `out` (resuming), plot, and write summary.json."""
    run_dir = RunDir(out, {"experiment": "ablate", **meta, **_jsonable(asdict(config))},
                     key=["sample", "setting", "condition"])
    summary = cast(AblationSummary,
                   run(vlm, samples, config, run_dir, reference_images, progress))
    summary["model"] = meta.get("model", summary["model"])
    summary["data"] = meta.get("data", "")
    summary["plot"] = str(grouped_bars(
        summary["drop"], run_dir.path / "ablation.png",
        f"Token ablation ({summary['model']}): % of correct answers broken", "% broken",
        errors=summary["ci95"]))
    run_dir.write_summary(summary)
    return summary


def needs_layout(condition: str) -> bool:
    """Conditions built from the object's mask (its tokens, their count) need a token layout;
    register tokens and random-K sets are positions only."""
    return not (condition == "register" or re.fullmatch(r"random-\d+", condition))


def _check_layout(spec, conditions) -> None:
    """On a family without a layout, only layout-free conditions run: all of them by default,
    and a condition asked for by name that needs pixels is one clear line."""
    bad = [c for c in conditions or () if needs_layout(c)]
    if not spec.geometric and bad:
        raise options_need_layout(spec.model_type, f"ablation conditions {', '.join(bad)}",
                                  "leave out --conditions (register and random-K run)")


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def run(vlm: ModelHandle, samples: list[Sample], config: AblationConfig, out: RunDir,
        reference_images=None, progress=None) -> dict:
    """Rows go to `out` as they are made (resumable); returns the summary.

    `vlm` may be a vislens.runs.ray_pool.RayPool: the vector is then computed by one
    worker and the samples are shared out, one unit per sample.
    """
    config.validate()
    _check_layout(vlm.family, config.conditions)
    if not samples:
        raise ValueError("no samples to ablate; check --data / --n")
    ex = executor(vlm)
    reference, record = resolve_reference(samples, config, reference_images)
    vector = ex.call(_vector, config, reference)
    injected = ex.call(_injected, config, reference)
    # targets follow Neo's deterministic rule, and `idx` seeds the noise and the random sets:
    # both are fixed here, before any sharding
    targets = choose_targets(samples, config.area)
    units = [(idx, s, t) for idx, (s, t) in enumerate(zip(samples, targets, strict=True))
             if t is not None and not all(out.done(sample=s.id, setting=setting,
                                                   condition="clean")
                                          for setting in config.settings)]
    ex.map(_unit, units, vector, injected, config, out=out, progress=progress,
           label="ablation")
    rows = out.rows()
    summary = summarise(rows, ex.info, config)
    summary["funnel"] = funnel.tally(samples, targets, rows, config.settings, noise=True)
    return {**summary, "reference": record}


def resolve_reference(samples: list[Sample], config: AblationConfig, given=None):
    """(the mean vector's reference images, what the summary records of them).

    `given` (images a caller passes) or `config.reference` (a data spec, e.g. imagenet:DIR,
    Neo et al.'s ImageNet val) when set; otherwise a held-out set disjoint from the evaluated
    images (`default_reference`), never the evaluated images themselves. The record: spec,
    n_images, default (vislens chose it), overlap (reference images that are also evaluated
    images, pixel for pixel) and disjoint (overlap == 0). Zero ablation needs none: (None, None).
    """
    if config.vector == "zeros":
        return None, None
    from vislens.data.resolve import reference_images

    if given is not None:
        images, spec, default = given, config.reference or "(given by the caller)", False
    elif config.reference:
        images, spec, default = reference_images(config.reference), config.reference, False
    else:
        spec, default = default_reference(samples), True
        images = reference_images(spec, REFERENCE_N)
    shared, total = overlap(images, [s.image for s in samples])
    if default and shared:  # a different world draws different scenes: never expected
        raise VislensError(f"the default reference set {spec} shares {shared} image(s) with the "
                           "evaluated data; pass --reference with a disjoint set")
    return images, {"spec": spec, "n_images": total, "default": default, "overlap": shared,
                    "disjoint": shared == 0}


def default_reference(samples: list[Sample]) -> str:
    """The reference set vislens picks when none is given: for ShapesWorld data, REFERENCE_N
    scenes of the next world after the evaluated ones that is neither evaluated nor a toy's
    training world (evaluating shapesworld:1000 -> shapesworld:1001). Other data has no
    held-out twin vislens could know of: the user names one (Neo et al. used ImageNet val)."""
    seeds = set()
    for s in samples:
        seed = s.meta.get("seed")
        if s.meta.get("source") != "shapesworld" or not isinstance(seed, int):
            raise VislensError(
                "the mean ablation vector averages reference images that must not be the "
                "evaluated ones (Neo et al.: ImageNet val); vislens picks a held-out set only "
                "for ShapesWorld data: pass --reference imagenet:DIR (or any data spec disjoint "
                "from --data), or --vector zeros")
        seeds.add(seed)
    seed = max(seeds) + 1
    while seed in seeds or seed in shapesworld.TRAINING_SEEDS:
        seed += 1
    return f"shapesworld:{seed}"


def _unit(vlm, out: RunDir, unit: tuple[int, Sample, int], vector, injected,
          config: AblationConfig) -> None:
    """Every setting of one sample not yet in `out`, computed together (the settings share
    the clean and noised prefix, the conditions' ablated prefix and the polling IG) and
    written setting by setting at the end."""
    idx, sample, target = unit
    # from another process: back to this model's device
    if isinstance(vector, torch.Tensor):
        vector = vector.to(vlm.device)
    if isinstance(injected, list):
        injected = [t.to(vlm.device) for t in injected]
    todo = [s for s in config.settings
            if not out.done(sample=sample.id, setting=s, condition="clean")]
    if not todo:
        return
    ctx = _Context(vlm, sample, target, idx, config, vector, injected, todo)
    rows = _shared_rows(ctx, todo)
    if rows is None:
        rows = _full_rows(ctx, todo)
    for setting in todo:
        for row in rows[setting]:
            out.add(row)


class _Context:
    """One sample's unit: what its settings share (questions, the noised image, the clean
    image's features and polling answer, the polling IG), each made once."""

    def __init__(self, vlm, sample: Sample, target: int, idx: int, config: AblationConfig,
                 vector, injected, settings: Sequence[str]) -> None:
        self.vlm, self.sample, self.target, self.idx = vlm, sample, target, idx
        self.config, self.vector, self.injected = config, vector, injected
        self.inst = sample.instances[target]
        self.noised = noise_object(sample.image, self.inst.mask, seed=config.seed + idx)
        self.questions = {s: asked(vlm, sample, target, s) for s in settings}
        self.ones: dict[str, object] = {}  # setting -> its one-sample clean batch
        # the clean image's features, and the one-sample batch they came from (None: from the
        # clean + noised pair's vision pass, which runs each image on its own)
        self.feats: tuple | None = None
        self.polling: tuple[list[int], Recorded | None] | None = None  # clean ids, prefix
        self.scores: np.ndarray | None = None

    def base(self, setting: str) -> dict:
        return {"sample": self.sample.id, "setting": setting, "target": self.inst.name,
                "target_area": self.inst.area}

    def one(self, setting: str):
        """The clean image with this setting's prompt, alone (token sets, IG)."""
        if setting not in self.ones:
            q = self.questions.get(setting) or question(self.sample, self.target, setting)
            self.ones[setting] = self.vlm.prepare([self.sample.image], [q.prompt],
                                                  [q.answer_prefix or None])
        return self.ones[setting]

    def clean_features(self, setting: str):
        """The clean image's features: one vision pass per sample (the processor gives every
        prompt the same pixels, checked; else this prompt's own pass)."""
        one = self.one(setting)
        if self.feats is None or (self.feats[1] is not None
                                  and not _same_pixels(self.feats[1], one)):
            self.feats = (self.vlm.image_embeddings(one), one)
        return self.feats[0]

    def ig(self) -> np.ndarray:
        """The polling-prompt IG, once per image, from the polling run's clean answer."""
        if self.scores is None:
            ids, recorded = self.polling if self.polling is not None else (None, None)
            self.scores = polling_attribution(
                self.vlm, self.sample, self.target, self.vector, self.injected, self.config,
                one=self.one("polling"), feats=self.clean_features("polling"), generated=ids,
                recorded=recorded)
        return self.scores

    def token_sets(self, setting: str, clean: list[int]) -> tuple[dict, list[str]]:
        one = self.one(setting)
        ig = self.ig if self.config.ig_prompt == "polling" else None
        sets = token_sets(self.vlm, one, self.clean_features(setting), self.inst.mask,
                          self.config, self.idx, self.questions[setting], self.vector, clean,
                          self.injected, ig)
        names = [n for n in self.config.condition_names(len(one.token_map)) if n in sets]
        return sets, names

    def funnel_rows(self, setting: str, texts: list[str]) -> tuple[list[dict], bool]:
        q, base = self.questions[setting], self.base(setting)
        clean_ok, noised_ok = q.is_correct(texts[0]), q.is_correct(texts[1])
        kept = clean_ok and not noised_ok
        return [{**base, "condition": "clean", "n_tokens": 0, "correct": clean_ok,
                 "text": texts[0], "kept": kept},
                {**base, "condition": "noised", "n_tokens": 0, "correct": noised_ok,
                 "text": texts[1], "kept": kept}], kept

    def skipped(self, setting: str) -> list[dict]:
        """VQA: the region word would not single out the target (funnel step)."""
        return [{**self.base(setting), "condition": "clean", "n_tokens": 0, "correct": False,
                 "text": "", "kept": False, "skipped": funnel.SKIPPED_REGION}]

    def condition_row(self, setting: str, name: str, sets: dict, text: str) -> dict:
        return {**self.base(setting), "condition": name, "n_tokens": len(sets[name]),
                "correct": self.questions[setting].is_correct(text), "text": text, "kept": True}


def _same_pixels(a, b) -> bool:
    """Whether two batches hold the same per-image inputs (pixels, grids)."""
    keys = [k for k, v in a.inputs.items() if not (v.dim() == 2 and v.shape == a.input_ids.shape)]
    other = [k for k, v in b.inputs.items() if not (v.dim() == 2 and v.shape == b.input_ids.shape)]
    return keys == other and all(torch.equal(a.inputs[k], b.inputs[k]) for k in keys)


def _full_rows(ctx: _Context, settings: list[str]) -> dict[str, list[dict]]:
    """The fallback, today's computation: per setting a clean + noised `generate`, then every
    condition of a kept setting as one `generate` under `ablate`; the clean image's vision
    pass and the polling IG (from the polling run's answer) are shared by the settings."""
    vlm, config = ctx.vlm, ctx.config
    rows: dict[str, list[dict]] = {}
    kept: dict[str, list[int]] = {}
    for setting in settings:
        q = ctx.questions[setting]
        if q is None:
            rows[setting] = ctx.skipped(setting)
            continue
        batch = vlm.prepare([ctx.sample.image, ctx.noised], [q.prompt] * 2,
                            [q.answer_prefix or None] * 2)
        generated = vlm.generate(batch, max_new_tokens=config.max_new_tokens[setting])
        rows[setting], ok = ctx.funnel_rows(setting, vlm.decode(generated))
        if setting == "polling":
            ctx.polling = (vlm.trim(generated[0]), None)
        if ok:
            kept[setting] = vlm.trim(generated[0])
    for setting, clean in kept.items():
        sets, names = ctx.token_sets(setting, clean)
        feats = ctx.clean_features(setting)
        batch = repeat_batch(ctx.one(setting), len(names))
        with ablate(vlm, [sets[n] for n in names], ctx.vector, injected=ctx.injected):
            gen = vlm.generate(batch, max_new_tokens=config.max_new_tokens[setting],
                               image_features=feats * len(names))
        rows[setting] += [ctx.condition_row(setting, n, sets, text)
                          for n, text in zip(names, vlm.decode(gen), strict=True)]
    return rows


def shared_prefix(batches: list) -> int:
    """P: how many first positions the batches' rows all share (token ids, no padding), cut
    so that every row keeps at least one position of its own (its last logits come from
    continuing it); 0 where they cannot share one."""
    rows = [b.input_ids[r] for b in batches for r in range(b.size)]
    if any(bool((b.attention_mask == 0).any()) for b in batches):
        return 0
    length = min(len(r) for r in rows)
    first = rows[0][:length]
    same = torch.ones(length, dtype=torch.bool, device=first.device)
    for r in rows[1:]:
        same &= r[:length] == first
    differ = torch.nonzero(~same)
    common = int(differ[0]) if len(differ) else length
    return min(common, length - 1)


def _shared_rows(ctx: _Context, settings: list[str]) -> dict[str, list[dict]] | None:
    """The settings computed once where they coincide, or None (then `_full_rows`).

    All settings' prompts put the image first, so their token ids agree up to P, past the
    last image token: the clean and the noised prefix [0, P) run once (`record`), and
    each setting continues its own tokens from there. A condition changes the input
    embeddings only at its image positions A, so its positions before min(A) are clean
    (no position sees a later one where the pass is `reusable`): its rows start from the
    clean keys and values there, run to P once for all settings, and each kept setting
    continues them with its own tokens. Decoding stops a row once its verdict is settled
    (experiments.decoding); the clean and noised rows decode in full, as generate does,
    so the funnel rows keep their texts.
    """
    vlm, config = ctx.vlm, ctx.config
    live = [s for s in settings if ctx.questions[s] is not None]
    if not live or refused(vlm) or decoding.plain_greedy(vlm):
        return None
    batches = {s: vlm.prepare([ctx.sample.image, ctx.noised], [ctx.questions[s].prompt] * 2,
                              [ctx.questions[s].answer_prefix or None] * 2) for s in live}
    first = batches[live[0]]
    p = shared_prefix(list(batches.values()))
    image_cols = np.flatnonzero(first.input_ids[0].cpu().numpy() == vlm.image_token_id)
    if not len(image_cols) or p <= int(image_cols.max()) or \
            not all(_same_pixels(first, b) for b in batches.values()):
        return None
    feats = vlm.image_embeddings(first)  # both images, one vision pass
    pair = record(vlm, cut_batch(first, p), feats)
    if not pair.reusable:
        return None
    clean = _row(pair, 0)
    ctx.feats = (_first(feats), None)
    rows: dict[str, list[dict]] = {s: ctx.skipped(s) for s in settings if s not in live}
    kept: dict[str, list[int]] = {}
    for s in live:
        tail = batches[s].input_ids[:, p:]
        cont = pair.rows(2, p)
        with torch.no_grad():
            logits = advance(vlm, cont, embed(vlm, tail))[:, -1]
        ids = decoding.greedy(vlm, cont, logits, config.max_new_tokens[s])
        rows[s], ok = ctx.funnel_rows(s, [decoding.decode_ids(vlm, i) for i in ids])
        if s == "polling":
            ctx.polling = (ids[0], clean)
        if ok:
            kept[s] = ids[0]
    if not kept:
        return rows
    per_setting = {s: ctx.token_sets(s, clean_ids) for s, clean_ids in kept.items()}
    # one prefix per distinct token set, whichever settings and conditions ask for it
    distinct: dict[tuple[int, ...], int] = {}
    for sets, names in per_setting.values():
        for n in names:
            distinct.setdefault(tuple(int(x) for x in sets[n]), len(distinct))
    ablated = ablated_prefix(vlm, clean, list(distinct), ctx.vector)
    for s, (sets, names) in per_setting.items():
        q = ctx.questions[s]
        cont = ablated.select([distinct[tuple(int(x) for x in sets[n])] for n in names])
        tail = batches[s].input_ids[:1, p:].expand(len(names), -1)
        with torch.no_grad():
            logits = advance(vlm, cont, embed(vlm, tail))[:, -1]
        ids = decoding.greedy(vlm, cont, logits, config.max_new_tokens[s], settled=q.settled)
        rows[s] += [ctx.condition_row(s, n, sets, decoding.decode_ids(vlm, i))
                    for n, i in zip(names, ids, strict=True)]
    return rows


def _row(recorded: Recorded, i: int) -> Recorded:
    """Row i of a recorded pass, as a pass of its own."""
    rows_dim = recorded.positions.dim() - 2
    return Recorded(embeds=recorded.embeds[i:i + 1], mask=recorded.mask[i:i + 1],
                    positions=recorded.positions.narrow(rows_dim, i, 1),
                    layers=[(k[i:i + 1], v[i:i + 1]) for k, v in recorded.layers],
                    why_not=recorded.why_not)


def _first(feats) -> ImageEmbeddings:
    """The first image's features, with what travels with them."""
    injected = None if getattr(feats, "injected", None) is None else feats.injected[:1]
    return ImageEmbeddings([feats[0]], injected, getattr(feats, "tokens_per_view", None))


@torch.no_grad()
def ablated_prefix(vlm, clean: Recorded, sets: list[Sequence[int]], vector) -> Rows:
    """One row per token set: the clean prefix of `clean` (all its positions) with the input
    embeddings at the set's positions replaced by `vector` ("zeros" or [hidden]), nothing
    else changed, as `ablate` does. A row recomputes positions from its set's first one
    (grouped: `start_groups`) and keeps the clean keys and values before; an empty set's
    row is the clean prefix (its last position recomputed)."""
    end = clean.seq_len
    starts = [min(s) if len(s) else end - 1 for s in sets]
    if any(not 0 <= x < end for s in sets for x in s):
        raise ValueError(f"ablated positions must lie in the recorded prefix 0..{end - 1}")
    hidden = clean.embeds.shape[-1]
    value = torch.zeros(hidden) if isinstance(vector, str) else vector
    done: list[tuple[list[int], int, Rows]] = []
    for group in start_groups(starts, end):
        start = min(starts[i] for i in group)
        rows = clean.rows(len(group), start)
        embeds = clean.embeds[:, start:].expand(len(group), -1, -1).clone()
        for j, i in enumerate(group):
            cols = torch.as_tensor(np.asarray(sets[i], dtype=np.int64) - start,
                                   device=embeds.device)
            if len(cols):
                embeds[j, cols] = value.to(embeds.device, embeds.dtype)
        advance(vlm, rows, embeds, **clean.after(start))
        done.append((group, start, rows))
    return _merge(clean, done, len(sets))


def _merge(clean: Recorded, groups: list[tuple[list[int], int, Rows]], n: int) -> Rows:
    """The groups' rows as one Rows in set order: the clean keys and values before the
    earliest start stay shared, each row holds its own from there."""
    first = min(start for _, start, _ in groups)
    end = clean.seq_len
    order = torch.as_tensor([i for group, _, _ in groups for i in group])
    back = torch.argsort(order)
    layers = []
    for layer, (keys, values) in enumerate(clean.layers):
        own_k, own_v = [], []
        for group, start, rows in groups:
            tail_k, tail_v = rows.layers[layer].tail
            m = len(group)
            own_k.append(torch.cat([keys[..., first:start, :].expand(m, -1, -1, -1), tail_k],
                                   -2))
            own_v.append(torch.cat([values[..., first:start, :].expand(m, -1, -1, -1),
                                    tail_v], -2))
        k = torch.cat(own_k)[back.to(keys.device)]
        v = torch.cat(own_v)[back.to(values.device)]
        layers.append(SharedPrefixLayer([(keys[..., :first, :], values[..., :first, :]),
                                         (k, v)], n))
    rows_dim = clean.positions.dim() - 2
    positions = clean.positions.expand(*clean.positions.shape[:rows_dim], n, end)
    return Rows(layers, clean.mask.expand(n, -1), positions)


def _vector(vlm, config: AblationConfig, images) -> torch.Tensor | str:
    if config.vector == "zeros":
        return "zeros"
    if config.vector != "mean":
        raise ValueError(f"unknown ablation vector {config.vector!r}; choose mean or zeros")
    return mean_image_embedding(vlm, images)  # streamed: a lazy reference set stays lazy


def _injected(vlm, config: AblationConfig, images):
    """What replaces injected (DeepStack) image features at ablated tokens: the vector's kind
    (zeros, or the references' per-layer means); None for a family without injection."""
    if not getattr(vlm.family, "deepstack", False):
        return None
    return "zeros" if config.vector == "zeros" else mean_injected_features(vlm, images)


def token_sets(vlm, batch, feats, mask: np.ndarray, config: AblationConfig, idx: int,
               q: Question, vector, clean: list[int], injected=None,
               ig=None) -> dict[str, np.ndarray]:
    """Every condition's token positions for the one-sample `batch`.

    clean: the clean generation's token ids (with `ig` None, its answer word is what
    integrated gradients explain, on this batch's own prompt: --ig-prompt own).
    ig: a function giving the image's patch-token IG scores, in image_positions order,
    computed elsewhere (the polling prompt's, shared by the settings: Neo et al.).
    """
    tm = batch.token_map
    image = tm.image_positions(0)
    norms = _patch_features(vlm, batch, feats).norm(dim=-1).float().cpu().numpy()
    sets = {"register": register_tokens(image, norms)}
    rng = np.random.default_rng([config.seed, idx])
    for k in config.random_ks:
        if k <= len(image):
            sets[f"random-{k}"] = np.sort(rng.choice(image, size=k, replace=False))
    if not tm.geometric:  # positions only: no object tokens, nothing matched to their count
        return sets
    obj = tm.positions(0, mask)
    obj1 = tm.dilate(obj, 1)
    sets.update({"object": obj, "object+1": obj1, "object+2": tm.dilate(obj, 2),
                 "all-but-object+1": np.setdiff1d(image, obj1)})
    sets["random-matched"] = np.sort(rng.choice(image, size=len(obj1), replace=False))
    wanted = config.conditions is None or "ig-matched" in config.conditions
    if wanted:
        if ig is not None:
            scores = ig()
        else:
            prefix, target_id = answer_token(vlm, clean, q)
            scores = integrated_gradients(vlm, extend_batch(batch, prefix), feats, target_id,
                                          vector, config.ig_steps, config.ig_batch, injected,
                                          sign=config.ig_sign)
        if len(scores) != len(image):
            raise ValueError(f"{len(scores)} IG scores for {len(image)} image tokens")
        sets["ig-matched"] = np.sort(image[np.argsort(-scores, kind="stable")[:len(obj1)]])
    return sets


def register_tokens(image: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """High-norm "register" tokens: post-projector L2 norm > mean + 2 std over the image's
    patch tokens, with the SAMPLE standard deviation (ddof 1) as Neo et al.'s torch.std."""
    if len(norms) < 2:
        return image[:0]
    return image[norms > norms.mean() + 2 * norms.std(ddof=1)]


def polling_attribution(vlm, sample: Sample, target: int, vector, injected,
                        config: AblationConfig, one=None, feats=None,
                        generated: list[int] | None = None,
                        recorded: Recorded | None = None) -> np.ndarray:
    """Neo et al.'s IG for every setting: on the polling question about the target, the
    answer word "yes" (the clean polling answer's own token, found token by token; never
    BOS), patch-token scores in image_positions order.

    What the polling setting's clean run already made is reused rather than remade: its
    one-sample batch `one`, the image's features `feats`, its answer's ids `generated`,
    and `recorded`, its clean pass over a prefix that holds every image token (then the
    IG passes start at the first image token, `integrated_gradients`)."""
    q = question(sample, target, "polling")
    if one is None:
        one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
    if feats is None:
        feats = vlm.image_embeddings(one)
    if generated is None:
        generated = vlm.trim(vlm.generate(one, max_new_tokens=config.max_new_tokens["polling"],
                                          image_features=feats)[0])
    prefix, target_id = yes_token(vlm, one, generated, q)
    return integrated_gradients(vlm, extend_batch(one, prefix), feats, target_id, vector,
                                config.ig_steps, config.ig_batch, injected, sign=config.ig_sign,
                                recorded=recorded)


def yes_token(vlm, batch, clean: list[int], q: Question) -> tuple[torch.Tensor, int]:
    """(tokens before the answer word, the answer word's first token) for a polling question:
    from the clean answer when it says "yes"; else, with nothing before it, the piece that
    starts the word "yes" (any capitalisation) the model ranks highest as its first token."""
    try:
        return answer_token(vlm, clean, q)
    except ValueError:
        pass
    from vislens.experiments.logit_lens import word_ids

    ids = sorted({i for w in {q.answer, q.answer.capitalize(), q.answer.upper()}
                  for i in word_ids(vlm.tokenizer, w)})
    if not ids:
        raise ValueError(f"the tokenizer has no piece for {q.answer!r}")
    with torch.no_grad():
        logits = vlm.forward(batch, logits_to_keep=1).logits[0, -1]
    best = ids[int(torch.argmax(logits[torch.tensor(ids, device=logits.device)]))]
    return torch.zeros(0, dtype=torch.long), int(best)


def _patch_features(vlm, batch, feats) -> torch.Tensor:
    """Post-projector features of the image PATCH tokens, in image_positions order."""
    return feats[0][_patch_rows(vlm, batch, feats)]


def _patch_rows(vlm, batch, feats) -> torch.Tensor:
    """Which of sample 0's feature rows are PATCH tokens (not newlines)."""
    tm = batch.token_map
    columns = np.flatnonzero(batch.input_ids[0].cpu().numpy() == vlm.image_token_id)
    keep = np.isin(columns, tm.image_positions(0))
    return torch.as_tensor(keep, device=feats[0].device)


def answer_token(vlm, clean: list[int], q: Question) -> tuple[torch.Tensor, int]:
    """The clean generation before the answer word, and the answer word's first token.

    Integrated gradients explain this token's logit: "Yes" for polling, the class
    name's FIRST piece for VQA and captions (for a multi-piece name such as
    "gir|affe" the first piece is where the model commits to the class; the rest
    follow from it). The word is found token by token (prompts.answer_span), never
    by a substring of the decoded text, and never BOS (the original code's bug).
    """
    span = answer_span(lambda ids: vlm.decode(torch.tensor([ids]))[0], clean, q)
    if span is None:
        raise ValueError("the clean answer does not contain the expected word")
    start = span[0]
    return torch.tensor(clean[:start], dtype=torch.long), int(clean[start])


@contextmanager
def frozen(model: torch.nn.Module):
    """Parameters without gradients while open: attribution needs d logit / d input only,
    and a 7B model's weight gradients alone would take 13 GB."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def integrated_gradients(vlm, batch, feats, target_id: int, vector, steps: int,
                         chunk: int = 0, injected=None, sign: str = "signed",
                         recorded: Recorded | None = None) -> np.ndarray:
    """IG attribution of each image patch token to the `target_id` logit at the last position.

    sign: "signed" sums a token's per-dimension attributions (they add up over the tokens to
    the logit difference below); "abs" sums their absolute values, Neo et al.'s ranking
    score (ablation_experiment.py: `integrated_grads.abs().sum(dim=-1)`), under which a
    token whose dimensions pull hard both ways ranks high; "dims" returns the per-dimension
    attributions themselves [tokens, dims] (DeepStack inputs appended along dims).

    The path runs from the ablation baseline (mean embedding, or zeros) to the
    clean embeddings in `steps` midpoint steps, `chunk` steps per forward pass (0: as many
    as the memory budget holds, `steps_per_pass`);
    attributions sum to logit(clean) - logit(baseline) up to the quadrature error.
    Where the LM also adds image features inside its first layers (Qwen3-VL's
    DeepStack), those move along the path from their baseline (`injected`: "zeros"
    or per-layer means) too, and a token's attribution sums over all its inputs,
    so the baseline is the token ablated as the ablation conditions ablate it.

    recorded: the clean pass (`continuation.record`) of the batch's first P positions, P
    past its last image token. Positions before the first image token are then the same
    on every path point, so each pass takes their keys and values from it and runs only
    the positions from the first image token on (the same logits, to float rounding).
    """
    if steps < 1 or chunk < 0:
        raise ValueError(f"integrated gradients need steps >= 1 and chunk >= 0 (got {steps}, "
                         f"{chunk})")
    if chunk == 0:
        chunk = steps_per_pass(vlm, batch.seq_len, steps)
    if sign not in (*IG_SIGNS, "dims"):
        raise ValueError(f"unknown IG sign {sign!r}; choose {', '.join(IG_SIGNS)} or dims")
    image = batch.token_map.image_positions(0)
    x = _patch_features(vlm, batch, feats).float()
    base = torch.zeros_like(x) if isinstance(vector, str) else \
        vector.float().to(x.device)[None].expand_as(x)
    inputs, bases = [x], [base]
    if injected is not None and getattr(feats, "injected", None) is not None:
        rows = _patch_rows(vlm, batch, feats)
        for layer, f in enumerate(feats.injected[0]):
            xi = f[rows.to(f.device)].float().to(x.device)
            inputs.append(xi)
            bases.append(torch.zeros_like(xi) if isinstance(injected, str) else
                         injected[layer].float().to(x.device)[None].expand_as(xi))
    alphas = (torch.arange(steps, dtype=torch.float32, device=x.device) + 0.5) / steps
    totals = [torch.zeros_like(v) for v in inputs]
    with frozen(vlm.model):
        for part in alphas.split(chunk):
            paths = [(b[None] + part[:, None, None] * (v - b)[None]).to(vlm.dtype)
                     for v, b in zip(inputs, bases, strict=True)]
            for path in paths:
                path.requires_grad_(True)
            if recorded is not None and recorded.reusable and len(paths) == 1:
                logits = _continued_logits(vlm, recorded, batch, image, paths[0])
            else:
                rows_ = repeat_batch(batch, len(part))
                per_sample = [[p[j] for p in paths[1:]] for j in range(len(part))]
                with ablate(vlm, [image] * len(part), list(paths[0].unbind(0)),
                            injected=per_sample if len(paths) > 1 else injected):
                    logits = vlm.forward(rows_, image_features=feats * len(part), grad=True,
                                         logits_to_keep=1).logits
            grads = torch.autograd.grad(logits[:, -1, target_id].sum(), paths)
            for total, grad in zip(totals, grads, strict=True):
                total += grad.float().sum(0)
    per_dim = torch.cat([(v - b) * t / steps for v, b, t in
                         zip(inputs, bases, totals, strict=True)], dim=-1).detach().cpu().numpy()
    return per_dim if sign == "dims" else token_scores(per_dim, sign)


CPU_STEPS_PER_PASS = 8  # on the CPU larger passes gain nothing and only hold more memory
GPU_BUDGET = 0.5  # share of the free GPU memory one IG pass may fill


def steps_per_pass(vlm, positions: int, steps: int) -> int:
    """How many IG steps one forward + backward pass takes: on a GPU as many as half its free
    memory holds, a step's autograd graph keeping about positions x (10 hidden + 3 MLP
    width) values per layer (inputs of the norms, projections, attention and MLP); on the
    CPU CPU_STEPS_PER_PASS. Fewer, larger passes run the same steps: only memory changes."""
    device = vlm.device
    if device.type != "cuda":
        return min(steps, CPU_STEPS_PER_PASS)
    config = vlm.language_model.config
    per_layer = positions * (10 * config.hidden_size + 3 * config.intermediate_size)
    per_step = per_layer * vlm.num_layers * torch.finfo(vlm.dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(steps, int(free * GPU_BUDGET // max(per_step, 1))))


def _continued_logits(vlm, recorded: Recorded, batch, image: np.ndarray,
                      path: torch.Tensor) -> torch.Tensor:
    """The last position's logits [n, 1, vocab] of the batch's one sample with the patch
    embeddings at `image` set to each row of `path` [n, tokens, hidden] (with its graph):
    positions before the first image token from `recorded`'s keys and values, the rest of
    its prefix from its embeddings, and the batch's tokens after the prefix as text."""
    n, end = int(path.shape[0]), recorded.seq_len
    start = int(image.min())
    if int(image.max()) >= end:
        raise ValueError(f"the recorded prefix ({end} positions) ends inside the image")
    rows = recorded.rows(n, start)
    hidden = recorded.embeds[:, start:].expand(n, -1, -1).clone()
    hidden[:, torch.as_tensor(image - start, device=hidden.device)] = path.to(hidden.dtype)
    logits = advance(vlm, rows, hidden, **recorded.after(start), grad=True)
    tail = batch.input_ids[:1, end:]
    if tail.shape[1]:
        with torch.no_grad():
            text = embed(vlm, tail).expand(n, -1, -1)
        logits = advance(vlm, rows, text, grad=True)
    return logits


def token_scores(per_dim: np.ndarray, sign: str) -> np.ndarray:
    """One score per token from its per-dimension attributions [tokens, dims]: "abs" sums
    their absolute values (Neo et al.), "signed" the values themselves."""
    if sign not in IG_SIGNS:
        raise ValueError(f"unknown IG sign {sign!r}; choose {' or '.join(IG_SIGNS)}")
    return np.abs(per_dim).sum(-1) if sign == "abs" else per_dim.sum(-1)


class AblationReference(TypedDict):
    """The mean vector's reference images (`resolve_reference`)."""

    spec: str  # their data spec
    n_images: int
    default: bool  # vislens chose them (no --reference)
    overlap: int  # of them also evaluated, pixel for pixel
    disjoint: bool  # overlap == 0


class AblationSummary(TypedDict):
    """summary.json of `vislens ablate` (what `execute` returns): `summarise`'s keys, then
    `run`'s (funnel, reference) and `execute`'s (model, data, plot). Read by
    report/sections.py `ablation_section` and experiments/study.py `_headline`;
    tests/test_summary_contract.py checks both against these keys."""

    model: str
    data: str
    n_kept: dict[str, int]  # setting -> samples kept (right clean, wrong noised)
    drop: dict[str, dict[str, float]]  # setting -> condition -> % of kept answers broken
    ci95: dict[str, dict[str, list[float]]]  # setting -> condition -> Wilson interval, %
    mean_tokens: dict[str, dict[str, float]]  # setting -> condition -> tokens ablated
    paper: dict[str, dict[str, int]]  # PAPER: Neo et al.'s % broken
    config: dict[str, Any]
    funnel: Funnel
    reference: AblationReference | None  # None: zero ablation
    plot: str  # ablation.png


def summarise(rows: list[dict], vlm, config: AblationConfig, data: str = "") -> dict:
    """The paper's table: % of kept samples each condition breaks, with 95% Wilson CIs."""
    kept_rows = [r for r in rows if r["kept"] and r["condition"] not in ("clean", "noised")]
    n_kept, drop, ci95, tokens = {}, {}, {}, {}
    for setting in config.settings:
        clean = [r for r in rows if r["setting"] == setting and r["condition"] == "clean"]
        n_kept[setting] = sum(r["kept"] for r in clean)
        drop[setting], ci95[setting], tokens[setting] = {}, {}, {}
        names = list(dict.fromkeys(r["condition"] for r in kept_rows if r["setting"] == setting))
        for name in names:
            broke = [not r["correct"] for r in kept_rows
                     if r["setting"] == setting and r["condition"] == name]
            drop[setting][name] = 100.0 * float(np.mean(broke))
            ci95[setting][name] = [100.0 * x for x in wilson_ci(sum(broke), len(broke))]
            tokens[setting][name] = float(np.mean([r["n_tokens"] for r in kept_rows
                                                   if r["setting"] == setting
                                                   and r["condition"] == name]))
    return {"model": getattr(vlm, "name", ""), "data": data, "n_kept": n_kept, "drop": drop,
            "ci95": ci95, "mean_tokens": tokens, "paper": PAPER,
            "config": {k: v for k, v in asdict(config).items() if k != "max_new_tokens"}}
