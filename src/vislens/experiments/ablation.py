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
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.data.samples import Question, Sample
from vislens.distributed import executor
from vislens.errors import VislensError
from vislens.experiments import funnel
from vislens.experiments.batching import extend_batch, repeat_batch
from vislens.experiments.prompts import MAX_NEW_TOKENS, answer_span, asked, question
from vislens.experiments.runs import RunDir
from vislens.experiments.selection import choose_targets, noise_object
from vislens.experiments.stats import wilson_ci
from vislens.interventions import ablate, mean_image_embedding, mean_injected_features
from vislens.interventions.reference import overlap
from vislens.report.plots import grouped_bars

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
    ig_batch: int = 8  # integrated-gradients steps per forward pass (memory)
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
        if self.ig_steps < 1 or self.ig_batch < 1:
            raise ValueError("--ig-steps must be at least 1")
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


def execute(vlm, samples: list[Sample], config: AblationConfig, out: Path, meta: dict,
            reference_images=None, progress=None) -> dict:
    """Run into directory `out` (resuming), plot, and write summary.json."""
    run_dir = RunDir(out, {"experiment": "ablate", **meta, **_jsonable(asdict(config))},
                     key=["sample", "setting", "condition"])
    summary = run(vlm, samples, config, run_dir, reference_images, progress)
    summary.update(model=meta.get("model", summary["model"]), data=meta.get("data", ""))
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
        raise VislensError(f"ablation conditions {', '.join(bad)} map the object's mask to "
                           f"image tokens, which needs a token layout; vislens has none for "
                           f"{spec.model_type!r}: leave out --conditions (register and "
                           "random-K run) or add a family module")


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def run(vlm, samples: list[Sample], config: AblationConfig, out: RunDir,
        reference_images=None, progress=None) -> dict:
    """Rows go to `out` as they are made (resumable); returns the summary.

    `vlm` may be a vislens.distributed.RayPool: the vector is then computed by one
    worker and the samples are shared out, one unit per sample.
    """
    config.validate()
    _check_layout(vlm.spec, config.conditions)
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
    """Every setting of one sample not yet in `out`."""
    idx, sample, target = unit
    # from another process: back to this model's device
    if isinstance(vector, torch.Tensor):
        vector = vector.to(vlm.device)
    if isinstance(injected, list):
        injected = [t.to(vlm.device) for t in injected]
    shared: dict[str, np.ndarray] = {}  # the polling-prompt IG, once per image

    def polling_ig() -> np.ndarray:
        if "scores" not in shared:
            shared["scores"] = polling_attribution(vlm, sample, target, vector, injected, config)
        return shared["scores"]

    ig = polling_ig if config.ig_prompt == "polling" else None
    for setting in config.settings:
        if out.done(sample=sample.id, setting=setting, condition="clean"):
            continue
        for row in _sample_rows(vlm, sample, target, setting, vector, injected, config, idx,
                                ig):
            out.add(row)


def _vector(vlm, config: AblationConfig, images) -> torch.Tensor | str:
    if config.vector == "zeros":
        return "zeros"
    if config.vector != "mean":
        raise ValueError(f"unknown ablation vector {config.vector!r}; choose mean or zeros")
    return mean_image_embedding(vlm, images)  # streamed: a lazy reference set stays lazy


def _injected(vlm, config: AblationConfig, images):
    """What replaces injected (DeepStack) image features at ablated tokens: the vector's kind
    (zeros, or the references' per-layer means); None for a family without injection."""
    if not getattr(vlm.spec, "deepstack", False):
        return None
    return "zeros" if config.vector == "zeros" else mean_injected_features(vlm, images)


def _sample_rows(vlm, sample: Sample, target: int, setting: str, vector, injected,
                 config: AblationConfig, idx: int, ig=None) -> Iterator[dict]:
    q = asked(vlm, sample, target, setting)
    max_new = config.max_new_tokens[setting]
    inst = sample.instances[target]
    base = {"sample": sample.id, "setting": setting, "target": inst.name,
            "target_area": inst.area}
    if q is None:  # VQA: the region word would not single out the target (funnel step)
        yield {**base, "condition": "clean", "n_tokens": 0, "correct": False, "text": "",
               "kept": False, "skipped": funnel.SKIPPED_REGION}
        return
    noised = noise_object(sample.image, inst.mask, seed=config.seed + idx)
    batch = vlm.prepare([sample.image, noised], [q.prompt] * 2, [q.answer_prefix or None] * 2)
    generated = vlm.generate(batch, max_new_tokens=max_new)
    texts = vlm.decode(generated)
    clean_ok, noised_ok = q.is_correct(texts[0]), q.is_correct(texts[1])
    kept = clean_ok and not noised_ok
    yield {**base, "condition": "clean", "n_tokens": 0, "correct": clean_ok, "text": texts[0],
           "kept": kept}
    yield {**base, "condition": "noised", "n_tokens": 0, "correct": noised_ok,
           "text": texts[1], "kept": kept}
    if not kept:
        return
    one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
    feats = vlm.image_embeddings(one)
    sets = token_sets(vlm, one, feats, inst.mask, config, idx, q, vector,
                      vlm.trim(generated[0]), injected, ig)
    names = [n for n in config.condition_names(len(one.token_map)) if n in sets]
    rows = repeat_batch(one, len(names))
    with ablate(vlm, [sets[n] for n in names], vector, injected=injected):
        gen = vlm.generate(rows, max_new_tokens=max_new, image_features=feats * len(names))
    for name, text in zip(names, vlm.decode(gen), strict=True):
        yield {**base, "condition": name, "n_tokens": len(sets[name]),
               "correct": q.is_correct(text), "text": text, "kept": True}


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
                        config: AblationConfig) -> np.ndarray:
    """Neo et al.'s IG for every setting: on the polling question about the target, the
    answer word "yes" (the clean polling answer's own token, found token by token; never
    BOS), patch-token scores in image_positions order."""
    q = question(sample, target, "polling")
    one = vlm.prepare([sample.image], [q.prompt], [q.answer_prefix or None])
    feats = vlm.image_embeddings(one)
    generated = vlm.generate(one, max_new_tokens=config.max_new_tokens["polling"],
                             image_features=feats)
    prefix, target_id = yes_token(vlm, one, vlm.trim(generated[0]), q)
    return integrated_gradients(vlm, extend_batch(one, prefix), feats, target_id, vector,
                                config.ig_steps, config.ig_batch, injected, sign=config.ig_sign)


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
                         chunk: int = 8, injected=None, sign: str = "signed") -> np.ndarray:
    """IG attribution of each image patch token to the `target_id` logit at the last position.

    sign: "signed" sums a token's per-dimension attributions (they add up over the tokens to
    the logit difference below); "abs" sums their absolute values, Neo et al.'s ranking
    score (ablation_experiment.py: `integrated_grads.abs().sum(dim=-1)`), under which a
    token whose dimensions pull hard both ways ranks high; "dims" returns the per-dimension
    attributions themselves [tokens, dims] (DeepStack inputs appended along dims).

    The path runs from the ablation baseline (mean embedding, or zeros) to the
    clean embeddings in `steps` midpoint steps, `chunk` steps per forward pass;
    attributions sum to logit(clean) - logit(baseline) up to the quadrature error.
    Where the LM also adds image features inside its first layers (Qwen3-VL's
    DeepStack), those move along the path from their baseline (`injected`: "zeros"
    or per-layer means) too, and a token's attribution sums over all its inputs,
    so the baseline is the token ablated as the ablation conditions ablate it.
    """
    if steps < 1 or chunk < 1:
        raise ValueError(f"integrated gradients need steps >= 1 and chunk >= 1 (got {steps}, "
                         f"{chunk})")
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


def token_scores(per_dim: np.ndarray, sign: str) -> np.ndarray:
    """One score per token from its per-dimension attributions [tokens, dims]: "abs" sums
    their absolute values (Neo et al.), "signed" the values themselves."""
    if sign not in IG_SIGNS:
        raise ValueError(f"unknown IG sign {sign!r}; choose {' or '.join(IG_SIGNS)}")
    return np.abs(per_dim).sum(-1) if sign == "abs" else per_dim.sum(-1)


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
