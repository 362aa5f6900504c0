"""What each experiment costs per image on the four paper checkpoints, counted on their
look-alikes at the real depth and extrapolated to the real 7-8B models:
`python benchmarks/real_checkpoints.py` writes benchmarks/REAL_CHECKPOINTS.md and .json.

The look-alikes (tests/lookalikes/, answers fitted by tests/answer_head.py) have the
real processors, token counts, vocabularies and prompts, so the WORK an experiment
asks of the language model per image (how many prompt tokens it runs, how many decode
steps, how long its sequences are) is exactly what the real model is asked; only the
width differs, and the depth is made real as below.

Real depth. The fitted look-alikes have 2 LM layers; the real models have 32 (LLaVA-1.5,
Llama-3-LLaVA-NeXT) or 28 (OneVision, Qwen2.5-VL), and what an experiment does depends on
it (knockout's windows are Neo et al.'s, scaled to the depth). Each run therefore counts on
a copy with the real number of layers (`deepen`): layers 2..L-1 are deep copies of the last
fitted layer appended to the decoder, each with its own layer_idx, and the text config's
num_hidden_layers and layer_types are set to match (the cache and the mask builders read
them). In the copies the attention output projection (o_proj) and the MLP down projection
(down_proj) are zero: they compute attention and MLP in full (the counted work is real)
but add exactly nothing to the residual stream, so every answer, and with it every
experiment's funnel, is the fitted 2-layer model's. Their attention and MLP run without
autograd: the gradient through them is exactly zero, the residual connection carries all
of it, and the backward of integrated gradients skips only products with zero matrices
(on a 2-core CPU it was most of an ablate run). `--check-depth` verifies all this: on
every checkpoint a left-padded batch of the three scenes asked each setting's question
gives the same greedy tokens, bit-identical last logits and final residual stream (every
position), and integrated gradients are bit-identical, on the 2-layer model and its
deepened copy (checked when this was written: equal on all four).

What is counted. A forward pre-hook on every decoder layer's self_attn module adds rows x
query tokens of the hidden states it receives: token x layer evaluations. A layer an
experiment skips (interventions/from_layer.py replaces a skipped layer's forward by an
identity, so its self_attn never runs) adds nothing; a pass over a cached prefix adds its
new tokens only (a decode step: rows x 1 per layer). The hook also adds rows x query
tokens x key tokens (attention work). A pre-hook on the language model keeps a per-call
log (rows, query tokens, cached or not, with gradients or not, layers computed), and the
older counters: prompt tokens of uncached passes, decode calls. Each (checkpoint,
experiment) runs in a fresh process on 1 and on 3 images; (three - one) / 2 is the cost
per image. The vision tower is not counted (it runs once per image in every variant),
nor is a backward pass (integrated gradients: counted as its forward). Each generate call
is logged too (rows, max_new_tokens, new tokens made): the look-alikes end a generation
after its answer, a real model's caption runs on, so the table also shows what every
generation run to its budget would cost. Ablation's mean vector averages the two
ImageNet stand-ins the real-checkpoint tests pass as --reference (vision tower only).

Three counts per experiment, token x layer evaluations per image:
- naive: the protocol run naively, every condition a full forward (or a generation) from
  scratch: from the BEFORE run's per-call log, every uncached call as rows x its full
  sequence x L (no layer skipped, nothing reused) and every decode step as rows x L.
  In the before code every uncached call runs the whole prompt, so this is exactly
  "every condition from scratch" over the same conditions (for ablate it equals before:
  the before code already ran every condition through every layer; knockout's before
  already resumed each window group at its first layer).
- before: vislens' src/ at BEFORE_COMMIT (main before "Compute only what an
  intervention changes"), kept in the JSON's "before" section, which a normal run
  never overwrites. `--record-before` (re)records it and refuses a source tree that
  differs from that commit's src/:
    git worktree add /tmp/before 943ca44
    python benchmarks/real_checkpoints.py --record-before --src /tmp/before/src
  (tests/ and this script come from the checkout they are run from.)
- after: whatever src/ tree the run imports (default: this checkout's src/).
Counts are exact, but decode steps follow greedy generations: a change in floating-point
rounding (another batching, say) can move where an ablated condition's generation stops.

Experiments: ablate (AblationConfig's defaults: ig_steps 50, new tokens generative 40,
polling 3, VQA 6), ablate-neo (Neo et al.'s released settings: ig_steps 50, generative
200 and polling 10 new tokens, docs/PROTOCOL.md A1), logit-lens, knockout (KnockoutConfig's
defaults are Neo's windows and conditions; there is no other variant: Neo's released code
ran the VQA setting alone, vislens runs polling and VQA), attention, perceive.

The 7B columns price the counted work on one GPU (estimates, not measurements: where a
device is lent, time the real shapes with benchmarks/run.py):
- an uncached pass (or one over a cached prefix): 2 x parameters of one decoder layer
  FLOPs per token x layer, plus 4 x hidden FLOPs per query x key x layer (attention),
  at SUSTAINED_FLOPS; a pass with gradients is priced twice (forward, and a backward
  that computes input gradients only, the weights being frozen); for the logit lens also
  2 x hidden x vocabulary per image token and residual state;
- a decode step reads the bf16 weights of each layer it computes, its keys and values
  (2 x KV width x 2 bytes per key and layer) and the LM head, at MEMORY_BANDWIDTH;
- so when "after" computes fewer token x layers, its 7B estimate shrinks with it;
- memory: bf16 weights, plus the largest call's activations (rows x sequence x
  (4 hidden + 2 MLP width) x 2 bytes); for perceive also the keys and values it spills
  per image to its temporary feature file (tokens x layers x 2 x KV width x 2 bytes,
  every layer, bf16) and what it holds in RAM per image while a task compares the
  images of an item (one source at a time: tokens x hidden x 4 bytes at most, the
  projector's width, in float32).

Rerun "after" for some rows only (the others keep their last numbers):
  python benchmarks/real_checkpoints.py --only llava-1.5-7b-hf --experiments ablate,knockout
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "REAL_CHECKPOINTS.md"
BEFORE_COMMIT = "943ca44a9c63895b185915304d67b35a19a931c5"
EXPERIMENTS = ("ablate", "ablate-neo", "logit-lens", "knockout", "attention", "perceive")
NEO_NEW_TOKENS = {"generative": 200, "polling": 10}  # docs/PROTOCOL.md A1 (`abl`:89, :100)
SUSTAINED_FLOPS = 400e12  # bf16 prefill on one H100 / H200 (~40% of dense peak)
MEMORY_BANDWIDTH = 3.3e12  # bytes/s, H100 SXM HBM3 (H200: 4.8e12)
COCO_IMAGES = 5000  # the GPU-hours line: Neo et al.'s A1 + A3 on this many images
REAL = {  # the real language models (configs in shared/notes/real-checkpoints.md)
    "llava-1.5-7b-hf": dict(params=6.74e9, vision=0.30e9, layers=32, hidden=4096, ff=11008,
                            vocab=32064, kv=4096),
    "llama3-llava-next-8b-hf": dict(params=8.03e9, vision=0.30e9, layers=32, hidden=4096,
                                    ff=14336, vocab=128320, kv=1024),
    "llava-onevision-qwen2-7b-ov-hf": dict(params=7.62e9, vision=0.40e9, layers=28,
                                           hidden=3584, ff=18944, vocab=152128, kv=512),
    "Qwen2.5-VL-7B-Instruct": dict(params=7.62e9, vision=0.67e9, layers=28, hidden=3584,
                                   ff=18944, vocab=152064, kv=512),
}


# ---- in the child process ---------------------------------------------------------------------
def deepen(vlm, layers: int) -> None:
    """Append copies of the last decoder layer, with o_proj and down_proj zeroed, until the
    LM has `layers` layers (see the module docstring); the text config follows."""
    import copy

    import torch

    stack = vlm.layers
    have = len(stack)
    if layers <= have:
        return
    template = stack[have - 1]
    for mod in template.modules():
        if mod._forward_pre_hooks or mod._forward_hooks:
            raise RuntimeError("deepen the model before any hook is registered on it")
    shared = {k: v for k, v in vars(template.self_attn).items() if k.startswith("_vislens")}
    for i in range(have, layers):
        layer = copy.deepcopy(template)
        with torch.no_grad():
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight.zero_()
                if getattr(proj, "bias", None) is not None:
                    proj.bias.zero_()
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
        for k, v in shared.items():  # vislens' per-model state: the same object, not a copy
            setattr(layer.self_attn, k, v)
        for branch in (layer.self_attn, layer.mlp):
            _without_backward(branch)
        stack.append(layer)
    configs = {id(c): c for c in (vlm.language_model.config,
                                  vlm.config.get_text_config(decoder=True))}
    for cfg in configs.values():
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list | tuple) and len(types) == have:
            cfg.layer_types = list(types) + [types[-1]] * (layers - have)
        cfg.num_hidden_layers = layers


def _without_backward(module) -> None:
    """Run `module` (a zeroed copy's attention or MLP) without recording it for autograd: its
    output is exactly zero, so is its gradient, and the residual connection carries the
    whole gradient past it. Forward work is unchanged (and counted); backward skips what
    would only multiply by a zero matrix (integrated gradients stay bit-identical)."""
    import torch

    inner = module.forward

    def forward(*args, **kwargs):
        with torch.no_grad():
            return inner(*args, **kwargs)

    module.forward = forward


def _past(kwargs: dict, layer: int | None = None) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
    if cache is None:
        return 0
    return int(cache.get_seq_length() if layer is None else cache.get_seq_length(layer))


def _counter(vlm):
    """Count token x layer evaluations (hooks on every self_attn), with a per-LM-call log."""
    import torch

    work = {"prefill_tokens": 0, "prefill_seq_sq": 0, "prefill_calls": 0, "decode_calls": 0,
            "decode_rows": 0, "max_rows_x_seq": 0, "token_layers": 0, "token_keys": 0}
    log: dict[tuple, dict] = {}
    state: dict = {"call": None}

    def new_call(rows, q, past, orphan=False):
        return {"rows": rows, "q": q, "cached": past > 0, "grad": torch.is_grad_enabled(),
                "orphan": orphan, "layers": 0, "tl": 0, "tk": 0, "kv": past + q}

    def close(call):
        key = tuple(call[k] for k in ("rows", "q", "cached", "grad", "orphan", "layers"))
        entry = log.setdefault(key, {k: call[k] for k in ("rows", "q", "cached", "grad",
                                                           "orphan", "layers")}
                               | {"n": 0, "tl": 0, "tk": 0, "kv": 0})
        entry["n"] += 1
        for k in ("tl", "tk", "kv"):
            entry[k] += call[k]

    def lm_pre(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            return
        b, s = int(x.shape[0]), int(x.shape[1])
        past = _past(kwargs)
        state["call"] = new_call(b, s, past)
        if past > 0:
            work["decode_calls"] += 1
            work["decode_rows"] += b
        else:
            work["prefill_calls"] += 1
            work["prefill_tokens"] += b * s
            work["prefill_seq_sq"] += b * s * s
            work["max_rows_x_seq"] = max(work["max_rows_x_seq"], b * s)

    def lm_post(module, args, output):
        if state["call"] is not None:
            close(state["call"])
            state["call"] = None

    def attn_pre(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        rows, q = int(h.shape[0]), int(h.shape[1])
        call = state["call"]
        layer = getattr(module, "layer_idx", None)
        past = _past(kwargs, layer) if any(k in kwargs for k in (
            "cache", "past_key_values", "past_key_value")) else (
            call["kv"] - call["q"] if call is not None else 0)
        own = call if call is not None else new_call(rows, q, past, orphan=True)
        own["layers"] += 1
        own["tl"] += rows * q
        own["tk"] += rows * q * (past + q)
        work["token_layers"] += rows * q
        work["token_keys"] += rows * q * (past + q)
        if call is None:
            close(own)

    vlm.language_model.register_forward_pre_hook(lm_pre, with_kwargs=True)
    vlm.language_model.register_forward_hook(lm_post, always_call=True)
    for layer in vlm.layers:
        layer.self_attn.register_forward_pre_hook(attn_pre, with_kwargs=True)
    return work, log


def _generations(vlm) -> dict:
    """Log each generate call of the model: rows and budget (max_new_tokens) -> calls, new
    tokens made (the longest row's), prompt tokens. What a real model, whose captions run
    on, would add if every generation used its whole budget follows from it (`at_budget`)."""
    log: dict[tuple, dict] = {}
    inner = vlm.model.generate

    def generate(*args, **kwargs):
        out = inner(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        seqs = getattr(out, "sequences", out)
        budget = kwargs.get("max_new_tokens") or vlm.model.generation_config.max_new_tokens
        rows, prompt = int(seqs.shape[0]), int(ids.shape[1]) if ids is not None else 0
        entry = log.setdefault((rows, int(budget)), {"rows": rows, "budget": int(budget),
                                                      "n": 0, "new": 0, "prompt": 0})
        entry["n"] += 1
        entry["new"] += int(seqs.shape[1]) - prompt
        entry["prompt"] += prompt
        return out

    vlm.model.generate = generate
    return log


def _load(name: str, depth: str):
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from answer_head import fitted_dir

    import vislens

    torch.set_num_threads(int(os.environ.get("REAL_CHECKPOINTS_THREADS", "2")))  # 1: shared CPU
    vlm = vislens.load(str(fitted_dir(name)))
    if depth == "real":
        deepen(vlm, REAL[name]["layers"])
    return vlm


def reference_images() -> list:
    """The mean ablation vector's reference set: the two ImageNet stand-ins the real-checkpoint
    tests pass as --reference (tests/e2e.py), never the evaluated scenes. Only the vision
    tower reads them, once per run (not per image)."""
    from vislens.data import tasks

    return [m.sample.image for m in tasks.semantic_maps(2, seed=4)]


def child(name: str, experiment: str, k: int, depth: str = "real") -> dict:
    """One measurement, in this (fresh) process: run `experiment` on k images."""
    vlm = _load(name, depth)
    from answer_head import lens_scenes, scenes

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    work, log = _counter(vlm)
    generations = _generations(vlm)
    out = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    summary: dict = {}
    if experiment in ("ablate", "ablate-neo"):
        from vislens.experiments import ablation
        from vislens.experiments.prompts import MAX_NEW_TOKENS

        config = ablation.AblationConfig(area=(1000, 2000))
        if experiment == "ablate-neo":
            config = ablation.AblationConfig(area=(1000, 2000), ig_steps=50,
                                             max_new_tokens={**MAX_NEW_TOKENS, **NEO_NEW_TOKENS})
        summary = ablation.execute(vlm, scenes()[:k], config, out / "a", {"model": name},
                                   reference_images=reference_images())
    elif experiment == "logit-lens":
        from vislens.experiments import logit_lens

        samples = (lens_scenes() * 3)[:k]
        for i, s in enumerate(samples):
            s.id = f"{s.id}-{i}"
        logit_lens.execute(vlm, samples, logit_lens.LensConfig(area=(20000, 30000), viewers=0),
                           out / "l", {"model": name})
    elif experiment == "knockout":
        from vislens.experiments import knockout

        summary = knockout.execute(vlm, scenes()[:k], knockout.KnockoutConfig(area=(1000, 2000)),
                                   out / "k", {"model": name})
    elif experiment == "attention":
        from vislens.experiments import attention

        attention.execute(vlm, scenes()[:k], attention.AttentionConfig(area=(1000, 2000),
                                                                       viewers=0),
                          out / "t", {"model": name})
    elif experiment == "perceive":
        from vislens.experiments.perception.features import extract

        images = [s.image for s in scenes()[:k]]
        extract(vlm, images, ["Describe this image."] * k)  # every layer, every source
    else:
        raise ValueError(f"unknown experiment {experiment!r}; choose from {EXPERIMENTS}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_load_mb": base_rss,
            "layers": vlm.num_layers, **work, "calls": list(log.values()),
            "generations": list(generations.values()),
            "n_kept": summary.get("n_kept")}


def check_depth(name: str) -> dict:
    """Greedy tokens, the last positions' logits, the final residual stream (every position,
    before the final norm) and integrated gradients of the fitted 2-layer model and of its
    deepened copy."""
    import torch

    vlm = _load(name, "fixture")
    from answer_head import scenes

    from vislens.experiments.prompts import question

    samples = scenes()
    batches = []
    for setting in ("generative", "polling", "vqa"):
        qs = [question(s, 0, setting) for s in samples]
        batches.append(vlm.prepare([s.image for s in samples], [q.prompt for q in qs],
                                   [q.answer_prefix or None for q in qs]))

    def outputs():
        got, final = [], []
        handle = vlm.final_norm.register_forward_pre_hook(lambda m, a: final.append(a[0]))
        for batch in batches:
            with torch.no_grad():
                logits = vlm.forward(batch, logits_to_keep=8).logits
            residual = final[-1]
            got.append((vlm.generate(batch, max_new_tokens=12), logits, residual))
        handle.remove()
        return got

    from vislens.experiments.ablation import integrated_gradients

    one = vlm.prepare([samples[0].image], [question(samples[0], 0, "polling").prompt])
    with torch.no_grad():
        target = int(vlm.forward(one, logits_to_keep=1).logits[0, -1].argmax())

    def attribution():  # integrated gradients (4 steps), per token and hidden dimension
        return integrated_gradients(vlm, one, vlm.image_embeddings(one), target, "zeros", 4,
                                    sign="dims")

    shallow, shallow_ig = outputs(), attribution()
    deepen(vlm, REAL[name]["layers"])
    deep, deep_ig = outputs(), attribution()
    return {"layers": [2, vlm.num_layers],
            "same_integrated_gradients": bool((shallow_ig == deep_ig).all()),
            "same_tokens": all(torch.equal(a[0], b[0]) for a, b in zip(shallow, deep)),
            "same_logits": all(torch.equal(a[1], b[1]) for a, b in zip(shallow, deep)),
            "same_final_residual": all(torch.equal(a[2], b[2]) for a, b in zip(shallow, deep)),
            "answers": [vlm.decode(g)[0] for g, _, _ in deep]}


# ---- in the parent ----------------------------------------------------------------------------
EVERY_LAYER = ("ablate", "ablate-neo")  # experiments whose every LM call runs every layer


def at_real_depth(name: str, run: dict) -> dict:
    """A run counted on the 2-layer look-alike, as on the real depth L: for an experiment
    whose every call runs every layer (ablation never skips one) each call's token x layer
    and token x key counts are its per-layer counts times the depth, so they scale by L / 2
    exactly (checked on LLaVA-1.5's ablate: 76,688 x 16 = 1,227,008, the real-depth count).
    Ten times faster to measure than the deepened copy."""
    depth = REAL[name]["layers"]
    f = depth / run["layers"]
    out = json.loads(json.dumps(run))
    out["layers"] = depth
    out["token_layers"] *= f
    out["token_keys"] *= f
    for call in out["calls"]:
        if call["layers"] != run["layers"]:
            raise ValueError(f"{name}: a call ran {call['layers']} of {run['layers']} layers; "
                             "only runs that never skip a layer scale to another depth")
        call["tl"] *= f
        call["tk"] *= f
        call["layers"] = depth
    return out


def measure(name: str, experiment: str, k: int, src: Path, depth: str = "real") -> dict:
    cmd = [sys.executable, __file__, "--child", name, experiment, str(k), "--depth", depth]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(src)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {experiment} k={k} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _decode(call: dict) -> bool:
    return call["cached"] and call["q"] == 1


def priced(name: str, experiment: str, run: dict, naive: bool = False) -> dict:
    """Token x layer evaluations of one run, and its 7B seconds: as it ran, or (naive) with
    every call a full pass over its whole sequence through every layer."""
    r = REAL[name]
    n_layers = run["layers"]
    h = r["hidden"]
    per_layer = 2 * h * h + 2 * h * r["kv"] + 3 * h * r["ff"]  # weights of one decoder layer
    tl = flops = moved = 0.0
    for c in run["calls"]:
        if naive and not c["orphan"]:
            c_tl = c["rows"] * c["q"] * n_layers * c["n"]
            c_tk = c["rows"] * c["q"] * n_layers * c["kv"]
            layer_calls = n_layers * c["n"]
        else:
            c_tl, c_tk, layer_calls = c["tl"], c["tk"], c["layers"] * c["n"]
        tl += c_tl
        if _decode(c):
            # bf16 weights of each computed layer and the LM head, keys and values read
            moved += 2 * (per_layer * layer_calls + h * r["vocab"] * c["n"]) \
                + c_tk * 2 * 2 * r["kv"]
        else:
            flops += (2 * per_layer * c_tl + 4 * h * c_tk) * (2 if c["grad"] else 1)
    if experiment == "logit-lens":  # every image token unembedded at every residual state
        flops += run["prefill_tokens"] * (r["layers"] + 1) * 2 * h * r["vocab"]
    return {"token_layers": tl, "seconds_7b": flops / SUSTAINED_FLOPS + moved / MEMORY_BANDWIDTH}


def at_budget(name: str, run: dict) -> dict:
    """What the run's generations would add if each ran to its budget (max_new_tokens) as a
    real model's caption may (the look-alikes stop after the answer): decode steps, token x
    layer evaluations (rows x every layer per step) and 7B seconds (weights and LM head per
    step, keys and values of prompt + budget per row and layer: an upper bound)."""
    r = REAL[name]
    n_layers, h = run["layers"], r["hidden"]
    per_layer = 2 * h * h + 2 * h * r["kv"] + 3 * h * r["ff"]
    steps = tl = moved = 0.0
    for g in run.get("generations", []):
        extra = g["n"] * g["budget"] - g["new"]  # a generation's first token is its prefill's
        steps += extra
        tl += g["rows"] * extra * n_layers
        keys = g["prompt"] / g["n"] + g["budget"]
        moved += extra * (2 * (per_layer * n_layers + h * r["vocab"])
                          + g["rows"] * keys * n_layers * 2 * 2 * r["kv"])
    return {"budget_decode_calls": steps, "budget_token_layers": tl,
            "budget_seconds_7b": moved / MEMORY_BANDWIDTH,
            "generate_calls": sum(g["n"] for g in run.get("generations", []))}


def per_image(name: str, experiment: str, one: dict, three: dict) -> dict:
    """(three - one) / 2 of every additive quantity, priced as run and naive."""
    def row(run):
        got = {k: run[k] for k in ("seconds", "prefill_tokens", "decode_calls")}
        got.update(priced(name, experiment, run))
        got.update({f"naive_{k}": v for k, v in priced(name, experiment, run, True).items()})
        got.update(at_budget(name, run))
        return got

    a, b = row(one), row(three)
    out = {k: (b[k] - a[k]) / 2 for k in a}
    out.update(max_rows_x_seq=three["max_rows_x_seq"], peak_rss_mb=three["peak_rss_mb"])
    return out


def memory(name: str, experiment: str, work: dict) -> dict:
    r = REAL[name]
    weights = 2 * (r["params"] + r["vision"])
    act = work["max_rows_x_seq"] * (4 * r["hidden"] + 2 * r["ff"]) * 2
    spilled = work["prefill_tokens"] * r["layers"] * 2 * r["kv"] * 2 \
        if experiment == "perceive" else 0
    held = work["prefill_tokens"] * r["hidden"] * 4 if experiment == "perceive" else 0
    return {"weights_gb": weights / 1e9, "activations_gb": act / 1e9,
            "disk_features_gb": spilled / 1e9, "ram_features_mb": held / 1e6}


def _git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def source_of(src: Path) -> dict:
    """Which vislens source a run imports: its checkout's commit, and whether src/ differs."""
    top = Path(_git("rev-parse", "--show-toplevel", cwd=src) or src)
    return {"src": str(src), "commit": _git("rev-parse", "HEAD", cwd=top),
            "src_dirty": bool(_git("status", "--porcelain", "--", str(src), cwd=top)),
            "src_same_as_before": subprocess.run(
                ["git", "diff", "--quiet", BEFORE_COMMIT, "--", str(src)], cwd=top,
                capture_output=True, check=False).returncode == 0}


def _number(x: float):
    return int(x) if float(x).is_integer() else round(x, 1)


def counts(raw: dict) -> dict:
    """{checkpoint: {experiment: {"naive", "before", "after"}}}: token x layer / image."""
    out: dict = {}
    for key, (one, three) in raw["after"]["runs"].items():
        name, experiment = key.split("/")
        after = per_image(name, experiment, one, three)
        old = raw.get("before", {}).get("runs", {}).get(key)
        before = per_image(name, experiment, *old) if old else None
        out.setdefault(name, {})[experiment] = {
            "naive": _number(before["naive_token_layers"]) if before else None,
            "before": _number(before["token_layers"]) if before else None,
            "after": _number(after["token_layers"])}
    return out


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _sources(raw: dict) -> str:
    """The after rows' sources in words: checkout commit, and src/ as at before or not."""
    seen: dict[str, int] = {}
    for src in raw["after"].get("sources", {}).values():
        words = f"a checkout at {src['commit'][:7]}" + (
            f" whose src/ is {BEFORE_COMMIT[:7]}'s" if src["src_same_as_before"] else
            " (src/ changed since before)") + (", with uncommitted changes" if src["src_dirty"]
                                                else "") + f", {src['measured']}"
        seen[words] = seen.get(words, 0) + 1
    return "; ".join(f"{n} rows {w}" for w, n in seen.items()) or "none"


def table(raw: dict, names, experiments) -> list[str]:
    before = raw.get("before", {})
    lines = [
        "# Cost per image on the paper checkpoints",
        "",
        "Written by `python benchmarks/real_checkpoints.py` (its docstring has the whole "
        "method). Each experiment runs on the fitted look-alikes (tests/lookalikes/, "
        "tests/answer_head.py: real processors, token counts, vocabularies and prompts; LM "
        "64 wide) made as deep as the real models: 32 decoder layers (LLaVA-1.5, NeXT) or "
        "28 (OneVision, Qwen2.5-VL), the layers after the two fitted ones copies of the "
        "last with their attention output projection (o_proj) and MLP down projection "
        "(down_proj) zeroed, so they compute attention and MLP in full but add nothing to "
        "the residual stream: every answer and every funnel is the fitted model's "
        "(`--check-depth`: same greedy tokens, bit-identical logits, final residual stream "
        "and integrated gradients on all four), while depth-dependent work (knockout's "
        "windows) is the real model's. Their attention and MLP run without autograd (the "
        "gradient through them is exactly zero; the residual connection carries it).",
        "",
        "**token x layer** = rows x query tokens summed over every decoder layer's "
        "self-attention call (a hook on each `self_attn`): a skipped layer counts nothing, "
        "a pass over a cached prefix (a decode step) counts its new tokens only. Per image "
        "= (run on 3 images - run on 1) / 2. **naive** = the protocol run naively, every "
        "condition a full forward (or generation) from scratch: the before run's calls, "
        "each uncached one as rows x whole sequence x layers, each decode step as rows x "
        f"layers. **before** = vislens' src/ at {BEFORE_COMMIT[:7]} (measured "
        f"{before.get('measured', '-')}, kept in REAL_CHECKPOINTS.json's `before`, "
        "rerecorded only by `--record-before`). **after** = the source the last run "
        f"of each row imported: {_sources(raw)}. "
        "ablate = AblationConfig's defaults (50 IG steps; 40 / 3 / 6 new tokens for "
        "generative / polling / VQA); ablate-neo = Neo et al.'s released settings (50 IG "
        "steps; 200 / 10 new tokens generative / polling). Knockout has one variant: its "
        "defaults are Neo's windows and conditions.",
        "",
        "Counts do not depend on the machine (no seconds of these runs are shown: they "
        "shared the CPU with other jobs). 7B columns price the counted work on one GPU at "
        f"{SUSTAINED_FLOPS / 1e12:.0f} TFLOP/s sustained bf16 (2 x one layer's parameters "
        "per token x layer, plus 4 x hidden per query x key x layer; a pass with gradients "
        f"twice) and {MEMORY_BANDWIDTH / 1e12:.1f} TB/s for decode steps (each computed "
        "layer's bf16 weights, keys and values, and the LM head read once per step): "
        "estimates, not measurements.",
        "",
        "| checkpoint | experiment | token x layer / image: naive | before | after | "
        "after / before | after / naive | LM prompt tokens / image | decode calls / image | "
        "7B s / image (est.): naive / before / "
        "after | 7B GPU GB (est.: weights + largest call) | 7B features / image (est.): "
        "disk GB (bf16) + RAM MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    hours: dict = {}
    budgets: dict = {}
    for name in names:
        for experiment in experiments:
            key = f"{name}/{experiment}"
            if key not in raw["after"]["runs"]:
                continue
            work = per_image(name, experiment, *raw["after"]["runs"][key])
            old = before.get("runs", {}).get(key)
            was = per_image(name, experiment, *old) if old else None
            mem = memory(name, experiment, work)
            naive_tl = was["naive_token_layers"] if was else None
            before_tl = was["token_layers"] if was else None
            secs = [was["naive_seconds_7b"] if was else None,
                    was["seconds_7b"] if was else None, work["seconds_7b"]]
            hours[(name, experiment)] = secs
            budgets[(name, experiment)] = work

            def fmt(x, spec=",.0f"):
                return "-" if x is None else format(x, spec)

            lines.append(
                f"| {name} | {experiment} | {fmt(naive_tl)} | {fmt(before_tl)} | "
                f"{fmt(work['token_layers'])} | {_ratio(work['token_layers'], before_tl)} | "
                f"{_ratio(work['token_layers'], naive_tl)} | "
                f"{work['prefill_tokens']:,.0f} | {work['decode_calls']:,.0f} | "
                f"{' / '.join(fmt(s, '.2f') for s in secs)} | "
                f"{mem['weights_gb']:.1f} + {mem['activations_gb']:.1f} | "
                + (f"{mem['disk_features_gb']:.2f} + {mem['ram_features_mb']:.0f} |"
                   if experiment == "perceive" else "- |"))
    lines += ["", "Generation budgets. The look-alikes end every generation after its "
              "answer (\"A giraffe.\", \"Yes\"), so a budget of 200 new tokens costs little "
              "more than 40 do here; a real model's caption runs on. Per image, the decode "
              "steps the after "
              "run took and the steps, token x layer evaluations and 7B seconds it would "
              "take if every generation ran to its budget (max_new_tokens; keys priced at "
              "prompt + budget: an upper bound):", "",
              "| checkpoint | experiment | generate calls / image | decode steps / image | "
              "at budget | token x layer / image at budget | 7B s / image at budget (est.) |",
              "|---|---|---|---|---|---|---|"]
    if not any(w["generate_calls"] for w in budgets.values()):
        lines += ["| (none: the after runs decode with vislens' own greedy loop, which stops a "
                  "row once its verdict is settled, not with generate) | | | | | | |"]
    for name in names:
        for experiment in experiments:
            work = budgets.get((name, experiment))
            if work is None or not work["generate_calls"]:
                continue
            lines.append(
                f"| {name} | {experiment} | {work['generate_calls']:,.0f} | "
                f"{work['decode_calls']:,.0f} | "
                f"{work['decode_calls'] + work['budget_decode_calls']:,.0f} | "
                f"{work['token_layers'] + work['budget_token_layers']:,.0f} | "
                f"{work['seconds_7b'] + work['budget_seconds_7b']:.2f} |")
    lines += ["", f"GPU-hours for Neo et al.'s A1 (ablate) + A3 (knockout) on {COCO_IMAGES:,} "
              "COCO images, one GPU, from the 7B estimates above (every image passing the "
              "selection, as every fixture scene does; on COCO fewer do, so these are upper "
              "bounds of the same work); the last column with every generation at its "
              "budget:", "",
              "| checkpoint | ablate settings | naive | before | after | after, at budget |",
              "|---|---|---|---|---|---|"]
    for name in names:
        for variant in ("ablate", "ablate-neo"):
            a, k = hours.get((name, variant)), hours.get((name, "knockout"))
            if a is None or k is None:
                continue
            full = [budgets[(name, e)]["seconds_7b"] + budgets[(name, e)]["budget_seconds_7b"]
                    for e in (variant, "knockout")]
            cells = ["-" if x is None or y is None else f"{COCO_IMAGES * (x + y) / 3600:,.1f}"
                     for x, y in [*zip(a, k), full]]
            lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("NAME", "EXPERIMENT", "K"))
    parser.add_argument("--depth", choices=("real", "fixture"), default="real",
                        help="fixture: count on the 2-layer look-alike and scale to the real "
                             f"depth (exact for {', '.join(EVERY_LAYER)} only; much faster)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", default="",
                        help="comma list of checkpoints to run (default: all four)")
    parser.add_argument("--experiments", default="",
                        help=f"comma list of experiments to run (default: {','.join(EXPERIMENTS)})")
    parser.add_argument("--src", type=Path, default=ROOT / "src",
                        help="the vislens source tree the runs import (default: this checkout's)")
    parser.add_argument("--record-before", action="store_true",
                        help=f"store these runs as 'before' too: run it against the pre-change "
                             f"source ({BEFORE_COMMIT[:7]}), e.g. with --src of a worktree there")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the table from the last measurements (no new runs)")
    parser.add_argument("--json", action="store_true",
                        help="print {checkpoint: {experiment: {naive, before, after}}} "
                             "(token x layer evaluations per image) on stdout")
    parser.add_argument("--check-depth", action="store_true",
                        help="check that the deepened look-alikes answer as the fitted ones")
    args = parser.parse_args()
    if args.child:
        name, experiment, k = args.child
        print(json.dumps(child(name, experiment, int(k), args.depth)))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from lookalikes import PAPER as NAMES

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(NAMES)
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()] or \
        list(EXPERIMENTS)
    bad = [n for n in names if n not in NAMES] + [e for e in experiments if e not in EXPERIMENTS]
    if args.depth == "fixture":
        bad += [f"{e} (at --depth fixture)" for e in experiments if e not in EVERY_LAYER]
    if bad:
        parser.error(f"unknown checkpoint(s) / experiment(s): {', '.join(bad)}")
    log = sys.stderr if args.json else sys.stdout
    if args.check_depth:
        for name in names:
            cmd = [sys.executable, "-c", "import sys, json; sys.path.insert(0, sys.argv[1]); "
                   "import real_checkpoints as r; print(json.dumps(r.check_depth(sys.argv[2])))",
                   str(Path(__file__).parent), name]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONPATH": str(args.src)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            print(name, done.stdout.strip().splitlines()[-1] if done.returncode == 0
                  else done.stderr[-2000:], file=log, flush=True)
        return
    raw_path = args.out.with_suffix(".json")
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    if "after" not in raw:  # an older file (one flat mapping of 2-layer runs): start afresh
        raw = {"before": raw.get("before", {}), "after": {"runs": {}, "sources": {}}}
    failed: list[str] = []
    if not args.table_only:
        source = source_of(args.src.resolve())
        if args.record_before and not source["src_same_as_before"]:
            parser.error(f"--record-before needs the source at {BEFORE_COMMIT[:7]}; "
                         f"{args.src} differs (use --src with a worktree at that commit)")
        today = f"{datetime.now(timezone.utc):%Y-%m-%d}"
        if args.record_before:
            raw["before"] = {"source": source, "measured": today,
                             "runs": raw.get("before", {}).get("runs", {})}
        for name in names:
            for experiment in experiments:
                key = f"{name}/{experiment}"
                start = time.perf_counter()
                try:
                    runs = [measure(name, experiment, 1, args.src, args.depth),
                            measure(name, experiment, 3, args.src, args.depth)]
                    if args.depth == "fixture":
                        runs = [at_real_depth(name, run) for run in runs]
                except RuntimeError as err:  # the other rows still run; exit 1 at the end
                    failed.append(key)
                    print(err, file=sys.stderr, flush=True)
                    continue
                raw["after"]["runs"][key] = runs
                raw["after"]["sources"][key] = {**source, "measured": today}
                if args.record_before:
                    raw["before"]["runs"][key] = runs
                raw_path.write_text(json.dumps(raw, indent=1) + "\n")
                work = per_image(name, experiment, *runs)
                print(f"{key}: {work['token_layers']:,.0f} token x layer / image "
                      f"({time.perf_counter() - start:.0f} s)", file=log, flush=True)
    lines = table(raw, NAMES, EXPERIMENTS)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=log)
    print(args.out, file=log)
    if args.json:
        print(json.dumps(counts(raw), indent=1))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
