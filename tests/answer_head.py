"""Look-alike checkpoints whose answers are right by construction: only the unembedding is fitted.

The look-alikes (tests/lookalikes/) have random weights, so their answers are almost
never right and every experiment that keeps only correctly answered samples
(ablation's noise filter, knockout's clean-correct filter) keeps none: the
conditions, integrated gradients and knockout windows would never run on a real
geometry. Here the decoder, vision tower and projector stay exactly as built; with
them frozen, the final residual at an answer position is a fixed function of
(image, prompt, tokens so far). Fitting `lm_head` alone (a linear map on those
residuals, after the unchanged final norm) on the test scenes below therefore
makes greedy decoding say what we choose, through the experiments' own prompts,
token ids, noise and positions:

- polling ("Is there a giraffe in this image?"): clean "Yes", object noised "No";
- VQA (prompts.question, answer prefix "It is"): clean "a giraffe", noised
  "a cat" (the scene's other object);
- generative ("Describe this image."): clean "A giraffe.", noised "A cat.";
- multiple choice (what surface shows: the images themselves for multi-image families,
  else their 2x2 composite; BLINK-style prompt): "(A)" or "(B)",
  right on the first item and wrong on the second;

each followed by the checkpoint's EOS. The states are recorded by teacher forcing
the continuation with `vlm.prepare` + `batching.extend_batch` + `vlm.forward` (the
knockout experiment's path: positions counted from the first real token, Qwen's
mRoPE from its own grids), the noise is `selection.noise_object` with the
ablation's seed (`config.seed + index`), and the prompts are
`prompts.question`'s. The logit-lens scenes (one large object each) add one more
family of states: the last-layer residuals of the first 8 object patches (half
covered or more) under the lens prompt must have the first piece of the class
name's head word in their top 5, so the lens has real multi-piece hits to find.

The fit is one linear programme (fit_head): 102-110 states per checkpoint (86-94
answer tokens, 16 lens patches), 26-27 unembedding rows, every state's target ahead
of every rival logit by 4; 0.5-2 s to record the states and about 2 s to solve on a
2-core CPU. Clean and noised states differ by only 0.1-1.6% of their norm, so the
fitted rows are large (norms up to a few thousand, against 0.16 for a random row):
a logit then moves by ~1e-6 of its scale between a batched and a lone run.

Nothing else is fitted, so everything an experiment measures beyond these answers
(what ablating or knocking out tokens does, features, artifacts) is the random
model's own behaviour.

`fitted_dir(name)` caches the result like lookalikes.checkpoint_dir, keyed by this
file, the look-alike's fingerprint and the vislens sources the states depend on. It takes
every look-alike of the registry alike. A fixture that ties its unembedding to its input
embeddings (Gemma 3, PaliGemma) gets its own lm_head in the fitted copy
(tie_word_embeddings off): fitting a tied row would also move that token's input
embedding, which the recorded states were computed with.

A family whose model soft-caps its logits (PaliGemma 2: 30 * tanh(z / 30)) would flatten
large fitted logits into ties, so there the fit also keeps every state's target logit
under half the cap, where the cap still keeps 79% of each margin.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lookalikes
import numpy as np
from lookalikes import cache_root, publish
from PIL import Image

from vislens.data._io import mask_box
from vislens.data.samples import Instance, Sample

# ---- the scenes -------------------------------------------------------------------------------
TARGETS = ("giraffe", "traffic light", "hair drier")  # pieces in every fixture's vocabulary
OTHERS = ("cat", "bus", "dog")  # the second object of each scene: what a noised scene shows
SIZES = ((640, 480), (560, 420), (640, 480))  # two sizes: batches need left padding
TARGET_RADIUS = 22  # a disk of ~1520 px^2: inside Neo et al.'s [1000, 2000] small-target range
SEED = 7
LENS_SIZES = ((640, 480), (384, 288))  # the second, small one keeps the lens cheap
LENS_SIDE = 158  # a square of ~25000 px^2: inside the logit-lens range [20000, 30000]
LENS_NAMES = ("giraffe", "traffic light")
ABLATION_SEED = 0  # AblationConfig.seed the CLI uses by default: noise seed = seed + index
MC_SEED = 9  # the multiple-choice items (written as a BLINK parquet by the tests)


def _canvas(rng, size, tint) -> np.ndarray:
    w, h = size
    px = np.broadcast_to(np.asarray(tint, np.float32), (h, w, 3)).copy()
    return px + rng.normal(0, 6, (h, w, 1)).astype(np.float32)


def _disk(size, cx, cy, r) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _rect(size, x0, y0, x1, y1) -> np.ndarray:
    w, h = size
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _image(px) -> Image.Image:
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "RGB")


def scenes() -> list[Sample]:
    """Three COCO-style scenes: one small target (the only one of its class, 1000-2000 px^2)
    and one larger object of another class, as Neo et al.'s ablation selection wants."""
    out = []
    tints = ((40, 40, 45), (60, 55, 45), (30, 40, 55))
    colors = ((230, 200, 40), (220, 30, 30), (40, 200, 220))
    other_colors = ((30, 170, 40), (150, 50, 200), (245, 245, 245))
    centres = ((120, 140), (300, 250), (520, 330))
    other_boxes = ((380, 300, 460, 380), (60, 60, 140, 140), (100, 320, 180, 400))
    for i, size in enumerate(SIZES):
        rng = np.random.default_rng([SEED, i])
        px = _canvas(rng, size, tints[i])
        target = _disk(size, *centres[i], TARGET_RADIUS)
        other = _rect(size, *other_boxes[i])
        px[target] = colors[i]
        px[other] = other_colors[i]
        out.append(Sample(
            id=f"scene-{i}", image=_image(px),
            instances=[Instance(TARGETS[i], target, mask_box(target)),
                       Instance(OTHERS[i], other, mask_box(other))],
            meta={"source": "coco"}))
    return out


def lens_scenes() -> list[Sample]:
    """One large object per image (the logit-lens selection: a single 20k-30k px^2 object)."""
    out = []
    for i, (size, name) in enumerate(zip(LENS_SIZES, LENS_NAMES, strict=True)):
        rng = np.random.default_rng([SEED, 100 + i])
        px = _canvas(rng, size, (35, 45, 40))
        w, h = size
        x0, y0 = w // 2 - LENS_SIDE // 2 + 40 * i, h // 2 - LENS_SIDE // 2
        mask = _rect(size, x0, y0, x0 + LENS_SIDE, y0 + LENS_SIDE)
        px[mask] = ((235, 190, 60), (200, 40, 40))[i]
        out.append(Sample(id=f"lens-{i}", image=_image(px),
                          instances=[Instance(name, mask, mask_box(mask))],
                          meta={"source": "coco"}))
    return out


def mc_items() -> list:
    """Two BLINK-style items (reference + two candidates, "which shows the same fill")."""
    from vislens.data import tasks

    return tasks.multiple_choice(2, seed=MC_SEED, kind="fill")


def mc_answer(k: int, item) -> str:
    """The fitted model picks the right candidate of item 0 and the wrong one of item 1."""
    pick = item.answer_index if k % 2 == 0 else 1 - item.answer_index
    return f"({chr(ord('A') + pick)})"


def answer(sample: Sample, setting: str, noised: bool) -> str:
    """The text the fitted model says: the target when it is visible, the other object not."""
    name = sample.instances[1 if noised else 0].name
    if setting == "polling":
        return "No" if noised else "Yes"
    if setting == "vqa":
        return f"a {name}"
    return f"A {name}."


# ---- the states -------------------------------------------------------------------------------
@dataclass
class States:
    x: list = field(default_factory=list)  # final-layer residuals (before the final norm)
    y: list = field(default_factory=list)  # target token ids
    top: list = field(default_factory=list)  # 1: must be the argmax; k: must be in the top k


def eos_id(vlm) -> int:
    """The id `generate` stops on: the generation config's EOS (its first, if a list)."""
    eos = vlm.model.generation_config.eos_token_id
    return int(eos[0] if isinstance(eos, list | tuple) else eos)


def continuation_ids(vlm, text: str, answer_text: str) -> list[int]:
    """Ids the model must emit after the rendered chat `text` to say `answer_text`.

    Taken from tokenising the whole exchange (so a SentencePiece '▁Yes' or a
    byte-level 'Ġa' come out as the tokenizer writes them in context), and checked
    to leave the prompt's own ids untouched.
    """
    sep = "" if text.endswith((" ", "\n")) else " "
    tok = vlm.tokenizer
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    full = tok(text + sep + answer_text, add_special_tokens=False)["input_ids"]
    if full[:len(prompt)] != prompt:
        raise AssertionError(f"the answer {answer_text!r} re-tokenises the prompt's end")
    return full[len(prompt):]


def answer_states(vlm, samples: list[Sample], seed: int = ABLATION_SEED) -> States:
    """Teacher-forced final-layer residuals of every answer token, clean and noised."""
    import torch

    from vislens.experiments import prompts
    from vislens.experiments.batching import extend_batch
    from vislens.experiments.selection import noise_object
    from vislens.interventions import capture

    out = States()
    last = vlm.num_layers
    for idx, sample in enumerate(samples):
        noised = noise_object(sample.image, sample.instances[0].mask, seed=seed + idx)
        for setting in ("polling", "vqa", "generative"):
            q = prompts.question(sample, 0, setting)
            for image, is_noised in ((sample.image, False), (noised, True)):
                one = vlm.prepare([image], [q.prompt], [q.answer_prefix or None])
                ids = continuation_ids(vlm, one.texts[0], answer(sample, setting, is_noised))
                ids = ids + [eos_id(vlm)]
                ext = extend_batch(one, torch.tensor(ids[:-1], dtype=torch.long))
                cols = np.arange(ext.seq_len - len(ids), ext.seq_len)
                with torch.no_grad(), capture(vlm, [cols], layers=[last - 1]) as cap:
                    vlm.forward(ext, logits_to_keep=1)
                out.x.append(cap.residual[last].float())
                out.y += ids
                out.top += [1] * len(ids)
    return out


def lens_states(vlm, samples: list[Sample], out: States, top_k: int = 5,
                coverage: float = 0.5, per_image: int = 8) -> States:
    """Last-layer residuals of object patches under the lens prompt -> the first piece of the
    class's head word (of "light" for "traffic light", as the lens's hit rule counts)."""
    import torch

    from vislens.experiments.logit_lens import PROMPT
    from vislens.interventions import capture

    last = vlm.num_layers
    for sample in samples:
        inst = sample.instances[0]
        one = vlm.prepare([sample.image], [PROMPT])
        pos, frac = one.token_map.coverage(0, inst.mask)
        on = pos[frac >= coverage][:per_image]  # a few suffice to give the lens real hits
        *head, word = inst.name.split()  # the lens counts the HEAD word ("light")
        piece = continuation_ids(vlm, " ".join(["It is a", *head]), word)[0]
        with torch.no_grad(), capture(vlm, [on], layers=[last - 1]) as cap:
            vlm.forward(one, logits_to_keep=1)
        out.x.append(cap.residual[last].float())
        out.y += [piece] * len(on)
        out.top += [top_k] * len(on)
    return out


def mc_states(vlm, items, out: States) -> States:
    """The answer to each multiple-choice item as surface asks it (surface.shown_images)."""
    import torch

    from vislens.experiments.batching import extend_batch
    from vislens.experiments.perception.surface import shown_images
    from vislens.interventions import capture

    last = vlm.num_layers
    for k, item in enumerate(items):
        one = vlm.prepare([shown_images(vlm, item)], [item.prompt()])
        ids = continuation_ids(vlm, one.texts[0], mc_answer(k, item)) + [eos_id(vlm)]
        ext = extend_batch(one, torch.tensor(ids[:-1], dtype=torch.long))
        cols = np.arange(ext.seq_len - len(ids), ext.seq_len)
        with torch.no_grad(), capture(vlm, [cols], layers=[last - 1]) as cap:
            vlm.forward(ext, logits_to_keep=1)
        out.x.append(cap.residual[last].float())
        out.y += ids
        out.top += [1] * len(ids)
    return out


# ---- the fit ----------------------------------------------------------------------------------
@dataclass
class Fit:
    weight: object  # the new lm_head weight [vocab, hidden]
    margins: np.ndarray  # per state: target logit - best other logit (top-1 states)
    top_margins: np.ndarray  # per top-k state: target logit - k-th best other logit
    n_states: int
    n_rows: int  # unembedding rows changed
    steps: int
    seconds: float


def fit_head(vlm, states: States, margin: float = 4.0, ceiling: float | None = None) -> Fit:
    """Rows of lm_head for the target tokens: the smallest (L1) change that gives every
    state its target with `margin`, as one linear programme.

    Greedy decoding only needs inequalities between logits, which are linear in the
    rows: for a top-1 state, target row minus every other fitted row >= margin, and
    target row >= the best FIXED row (the other rows keep their random values) +
    margin; a top-k state must beat every other fitted row and the k-th best fixed
    row. Clean and noised states differ by ~0.1-1% of their norm, which gradient
    descent on a soft margin loss did not resolve; the linear programme either meets
    every inequality or says the states are not separable. `ceiling` bounds every
    state's target logit from above (for a soft-capped head).
    """
    import torch
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    start = time.perf_counter()
    with torch.no_grad():
        x = vlm.final_norm(torch.cat(states.x)).double()
    y = torch.tensor(states.y)
    top = torch.tensor(states.top)
    rows = torch.unique(y)
    old = vlm.lm_head.weight.detach().double()
    keep = torch.ones(len(old), dtype=torch.bool)
    keep[rows] = False
    kmax = int(top.max())
    with torch.no_grad():  # the best fixed rivals of every state, in chunks of the vocabulary
        rival = torch.full((len(x), kmax), -torch.inf, dtype=torch.float64)
        for chunk in torch.arange(len(old)).split(16384):
            chunk = chunk[keep[chunk]]
            if len(chunk):
                rival = torch.cat([rival, x @ old[chunk].T], 1).topk(kmax, dim=1).values
    n_rows, dim = len(rows), x.shape[1]
    label = torch.searchsorted(rows, y).numpy()
    xs = x.numpy()
    bound = rival.gather(1, (top - 1)[:, None])[:, 0].numpy()
    # variables: W (n_rows x dim) = P - M, P, M >= 0; inequalities A @ [P, M] <= b
    data, ii, jj, b = [], [], [], []

    def add(state, terms, rhs):
        """One inequality sum(sign * w_row . x_state) >= -rhs, written as A @ v <= rhs."""
        for row, sign in terms:
            cols = np.arange(row * dim, (row + 1) * dim)
            for offset, part in ((0, 1.0), (n_rows * dim, -1.0)):  # W = P - M
                data.extend(-sign * part * xs[state])
                ii.extend([len(b)] * dim)
                jj.extend(cols + offset)
        b.append(rhs)

    for state in range(len(xs)):
        t = int(label[state])
        add(state, [(t, 1.0)], -(bound[state] + margin))
        if ceiling is not None:
            add(state, [(t, -1.0)], ceiling)
        for r in range(n_rows):
            if r != t:
                add(state, [(t, 1.0), (r, -1.0)], -margin)
    a = coo_matrix((data, (ii, jj)), shape=(len(b), 2 * n_rows * dim)).tocsr()
    res = linprog(np.ones(2 * n_rows * dim), A_ub=a, b_ub=np.asarray(b), bounds=(0, None),
                  method="highs")
    if res.status != 0:
        raise RuntimeError(f"no unembedding separates these {len(xs)} states ({res.message})")
    w = torch.tensor(res.x[:n_rows * dim] - res.x[n_rows * dim:]).view(n_rows, dim)
    z = x @ w.T
    target = z.gather(1, torch.as_tensor(label)[:, None])[:, 0]
    others = z.scatter(1, torch.as_tensor(label)[:, None], -torch.inf).max(1).values
    gap = (target - torch.maximum(others, torch.as_tensor(bound))).numpy()
    new = vlm.lm_head.weight.detach().clone()
    new[rows] = w.to(new.dtype)
    one = (top == 1).numpy()
    return Fit(weight=new, margins=gap[one], top_margins=gap[~one], n_states=len(x),
               n_rows=n_rows, steps=int(res.nit), seconds=time.perf_counter() - start)


# ---- the cached directory ---------------------------------------------------------------------
SOURCES = (  # vislens files the recorded states depend on
    "experiments/prompts.py", "experiments/selection.py", "experiments/batching.py",
    "models/prompting.py", "models/vlm.py", "models/loading.py", "models/novideo.py",
    "interventions/capture.py", "interventions/attention_function.py",
    "experiments/perception/surface.py", "data/tasks.py", "data/samples.py",
)


def key(name: str) -> str:
    import vislens

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(lookalikes.fingerprint(name).encode())
    root = Path(vislens.__file__).parent
    for rel in SOURCES:
        digest.update((root / rel).read_bytes())
    from vislens.experiments.logit_lens import PROMPT

    digest.update(PROMPT.encode())  # the lens states' prompt (not the whole lens module)
    return digest.hexdigest()[:16]


def build(name: str, out: Path) -> dict:
    """Copy the fixture `name` into `out` with the fitted unembedding; returns the fit report."""
    from safetensors.torch import load_file, save_file

    import vislens

    src = lookalikes.checkpoint_dir(name)
    vlm = vislens.load(str(src))
    t = time.perf_counter()
    states = answer_states(vlm, scenes())
    lens_states(vlm, lens_scenes(), states)
    mc_states(vlm, mc_items(), states)
    record = time.perf_counter() - t
    cap = vlm.family.logit_softcap(vlm.config)
    fit = fit_head(vlm, states, ceiling=None if cap is None else cap / 2)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    heads = [k for k in tensors if k.endswith("lm_head.weight")]
    if heads:
        (head,) = heads
    else:  # tied to the input embeddings: the fitted copy gets a head of its own
        head = "lm_head.weight"
        config = json.loads((out / "config.json").read_text())
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors[head] = fit.weight.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = {"checkpoint": name, "states": fit.n_states, "rows": fit.n_rows,
              "steps": fit.steps, "record_seconds": round(record, 2),
              "fit_seconds": round(fit.seconds, 2),
              "min_margin": float(fit.margins.min()),
              "min_top_margin": float(fit.top_margins.min()) if len(fit.top_margins) else None}
    (out / "answer_head.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def fitted_dir(name: str) -> Path:
    """The cached fitted copy of fixture `name`, built first when this source has none."""
    return publish(cache_root() / f"{name}-answers-{key(name)}", lambda tmp: build(name, tmp))
