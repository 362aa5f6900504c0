"""Pre-rendered training pool and batches in the exact token layout of the chat template.

Rendering a scene costs more than a training step's share of it, so a pool of
scenes is drawn once (pixels as uint8, coverage, attribute ids) and batches
sample questions from it. Sequences are built from token ids directly for
speed; `tests/test_toy.py` checks they equal the processor's chat-template output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.data.samples import SETTINGS, Question, Sample
from vislens.toy.oracle import MAX_OBJECTS, attribute_ids, coverage, shape_order_key

IGNORE = -100


@dataclass
class Pool:
    """A fixed set of scenes with everything a training step needs."""

    samples: list[Sample]
    pixels: torch.Tensor  # uint8 [N, 3, H, W]
    cov: torch.Tensor  # float [N, K, P]
    colors: torch.Tensor  # long [N, K]
    shapes: torch.Tensor  # long [N, K]


def make_pool(n: int, seed: int, grid: int, word_id: dict[str, int], start: int = 0,
              n_objects: tuple[int, int] = (1, MAX_OBJECTS)) -> Pool:
    samples = shapesworld.generate(n, seed=seed, start=start, n_objects=n_objects)
    pixels = np.stack([np.asarray(s.image, dtype=np.uint8).transpose(2, 0, 1) for s in samples])
    cov = np.stack([coverage(s, grid, grid) for s in samples])
    ids = [attribute_ids(s, word_id) for s in samples]
    return Pool(samples=samples, pixels=torch.from_numpy(pixels), cov=torch.from_numpy(cov),
                colors=torch.from_numpy(np.stack([c for c, _ in ids])),
                shapes=torch.from_numpy(np.stack([s for _, s in ids])))


class SceneStream:
    """Scenes that are never repeated: pool after pool of new scenes of one world.

    Why: on a fixed pool of 2,000 scenes the vision tower memorised its scenes
    (shape readout 0.93 on them against 0.85 on held-out ones); a scene renders
    in ~2 ms, so the vision stages simply never see a scene twice.
    """

    def __init__(self, seed: int, grid: int, word_id: dict[str, int], start: int, size: int,
                 every: int = 1):
        self.seed, self.grid, self.word_id = seed, grid, word_id
        self.start, self.size, self.every = start, size, every
        self.current: Pool | None = None
        self.current_start: int | None = None

    def next(self) -> Pool:
        pool = make_pool(self.size, self.seed, self.grid, self.word_id, start=self.start)
        self.current_start = self.start
        self.start += self.size
        return pool

    def at(self, step: int) -> Pool:
        """The pool for a stage's `step`: a new one every `every` steps, from step 0 on."""
        if self.current is None or step % self.every == 0:
            self.current = self.next()
        return self.current

    def state(self) -> dict:
        """The position in the world: enough to rebuild the current pool and the next."""
        return {"start": self.start, "current_start": self.current_start}

    def restore(self, state: dict) -> None:
        """Continue from `state`; the current pool is re-rendered (scenes are a function
        of their index), since a resumed stage may be half-way through it."""
        self.current, self.current_start = None, state["current_start"]
        if self.current_start is not None:
            self.current = make_pool(self.size, self.seed, self.grid, self.word_id,
                                     start=self.current_start)
        self.start = state["start"]


def normalise_pixels(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [B,3,H,W] -> what the CLIP image processor gives (rescale then normalise)."""
    x = pixels.float() / 255.0
    m = torch.tensor(mean, dtype=x.dtype)[None, :, None, None]
    s = torch.tensor(std, dtype=x.dtype)[None, :, None, None]
    return (x - m) / s


class Encoder:
    """Turns questions into the toy's token layout, several questions per image.

    One sequence is `<s> <image>*P` followed by blocks `prompt <sep> prefix answer </s>`.
    A 4-D mask lets every block see the image prefix and itself only, and every
    block's positions restart right after the image, so each block is computed
    exactly as the single-question sequence the chat template gives, while the
    144 image tokens are paid for once per image instead of once per question.
    """

    def __init__(self, tokenizer, n_image_tokens: int):
        self.vocab = tokenizer.get_vocab()
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.image = self.vocab["<image>"]
        self.sep = self.vocab["<sep>"]
        self.n_image = n_image_tokens

    def words(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def prefix(self) -> list[int]:
        return [self.bos] + [self.image] * self.n_image

    def block(self, prompt: str, answer_prefix: str, answer: str,
              focus: list[int] | None = None, owners: dict[str, int] | None = None
              ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Ids, labels (labels[t] is the token after t), answer focus and word focus.

        `focus[j]` names the instance answer word j is about (-1: none); it is placed at
        the position that predicts the word. `owners` maps a color / shape word to the
        instance that has it; each such word in the block is marked at its own position.
        Both feed the attention auxiliary losses.
        """
        ctx_words = prompt.split() + ["<sep>"] + answer_prefix.split()
        ctx = self.words(prompt) + [self.sep] + self.words(answer_prefix)
        words = self.words(answer)
        target = words + [self.eos]
        ids = ctx + target
        labels = [IGNORE] * (len(ctx) - 1) + target + [IGNORE]
        about = list(focus or []) + [-1] * (len(words) + 1 - len(focus or []))
        focus_row = [-1] * (len(ctx) - 1) + about + [-1]
        owners = owners or {}
        word_row = [owners.get(w, -1) for w in ctx_words + answer.split()] + [-1]
        return ids, labels, focus_row, word_row

    def pack(self, blocks_per_image: list[list[tuple[list[int], list[int], list[int]]]],
             patches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Right-padded packed batch with `position_ids` and a boolean 4-D `attention_mask`.

        `patches` [B, M] (sorted patch indices) keeps only those image tokens, each at
        the position it has in the full sequence, so rotary distances stay exact.
        """
        n_keep = self.n_image if patches is None else patches.shape[1]
        head = [self.bos] + [self.image] * n_keep
        n_head = len(head)
        n_full = self.n_image + 1
        lengths = [n_head + sum(len(blk[0]) for blk in blocks) for blocks in blocks_per_image]
        n = max(lengths)
        b = len(blocks_per_image)
        ids = torch.full((b, n), self.pad, dtype=torch.long)
        labels = torch.full((b, n), IGNORE, dtype=torch.long)
        pos = torch.zeros((b, n), dtype=torch.long)
        block = torch.full((b, n), -1, dtype=torch.long)  # running block number, for scoring
        focus = torch.full((b, n), -1, dtype=torch.long)
        word_focus = torch.full((b, n), -1, dtype=torch.long)
        mask = torch.eye(n, dtype=torch.bool).repeat(b, 1, 1)
        causal_head = torch.ones(n_head, n_head, dtype=torch.bool).tril()
        for i, blocks in enumerate(blocks_per_image):
            ids[i, :n_head] = torch.tensor(head)
            pos[i, :n_head] = (torch.arange(n_head) if patches is None
                               else torch.cat([torch.zeros(1, dtype=torch.long), patches[i] + 1]))
            mask[i, :n_head, :n_head] = causal_head
            at = n_head
            for k, (block_ids, block_labels, block_focus, block_words) in enumerate(blocks):
                block[i, at:at + len(block_ids)] = k + i * 1000
                m = len(block_ids)
                ids[i, at:at + m] = torch.tensor(block_ids)
                labels[i, at:at + m] = torch.tensor(block_labels)
                focus[i, at:at + m] = torch.tensor(block_focus)
                word_focus[i, at:at + m] = torch.tensor(block_words)
                pos[i, at:at + m] = torch.arange(n_full, n_full + m)
                mask[i, at:at + m, :n_head] = True
                mask[i, at:at + m, at:at + m] = torch.ones(m, m, dtype=torch.bool).tril()
                at += m
        return {"input_ids": ids, "labels": labels, "position_ids": pos,
                "attention_mask": mask[:, None], "block": block,
                "focus": focus, "word_focus": word_focus}


def scene_questions(sample: Sample, rng: np.random.Generator, targets: int = 2,
                    settings: tuple[str, ...] = SETTINGS,
                    keep: dict[str, float] | None = None) -> list[Question]:
    """The caption plus every polling and VQA question about `targets` random objects.

    `keep` thins question kinds (kind -> probability of keeping each question).
    """
    out: list[Question] = []
    if "generative" in settings:
        out += shapesworld.questions(sample, "generative", rng=rng)
    for _ in range(targets):
        for setting in ("polling", "vqa"):
            if setting in settings:
                out += shapesworld.questions(sample, setting, rng=rng)
    if keep:
        out = [q for q in out if rng.random() < keep.get(q.kind, 1.0)]
    return out


def qa_batch(pool: Pool, idx: np.ndarray, encoder: Encoder, rng: np.random.Generator,
             targets: int = 2, settings: tuple[str, ...] = SETTINGS,
             background: int | None = None, peaks_only: bool = False,
             keep: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Packed batch of all questions about the scenes `idx`, with their oracle inputs.

    `background=k` keeps only object patches plus k random background patches per
    image (a cheap stage-A batch: empty background tokens carry nothing to learn);
    with `peaks_only` each object keeps only its most covered patch (the curriculum's
    first step: one candidate token per object makes the lookup easy to find).
    """
    blocks = []
    for i in idx:
        sample = pool.samples[int(i)]
        qs = scene_questions(sample, rng, targets, settings, keep) or \
            scene_questions(sample, rng, targets, settings)
        owners = {inst.attributes[a]: k for k, inst in enumerate(sample.instances)
                  for a in ("color", "shape")}
        blocks.append([encoder.block(q.prompt, q.answer_prefix, q.answer,
                                     answer_focus(sample, q), owners) for q in qs])
    t = torch.as_tensor(idx, dtype=torch.long)
    cov = pool.cov[t]
    patches = None
    if background is not None:
        patches = _keep_patches(cov, background, rng, peaks_only)
        cov = torch.gather(cov, 2, patches[:, None, :].expand(-1, cov.shape[1], -1))
    out = encoder.pack(blocks, patches)
    out.update(cov=cov, colors=pool.colors[t], shapes=pool.shapes[t], pixels=pool.pixels[t])
    if patches is not None:
        out["patches"] = patches
    return out


def answer_focus(sample: Sample, q: Question) -> list[int]:
    """Which instance each answer word is about: captions name objects in shape order
    ("a <color> <shape> and ..."); a short answer is about the question's target."""
    if q.setting != "generative":
        return [q.target if q.target is not None else -1]
    out: list[int] = []
    for k in shape_order_key(sample):
        out += [-1, k, k, -1]  # a, color, shape, and/.
    return out


def _keep_patches(cov: torch.Tensor, background: int, rng: np.random.Generator,
                  peaks_only: bool = False) -> torch.Tensor:
    """[B, M] sorted patch indices: object patches, then background up to a shared M."""
    covered = (cov.sum(1) > 0).numpy()
    if peaks_only:
        peaks = np.zeros_like(covered)
        for i, c in enumerate(cov.numpy()):
            for k in np.flatnonzero(c.sum(1) > 0):
                peaks[i, int(c[k].argmax())] = True
        return _fill(peaks, ~covered, background, rng)
    return _fill(covered, ~covered, background, rng)


def _fill(keep: np.ndarray, background_mask: np.ndarray, background: int,
          rng: np.random.Generator) -> torch.Tensor:
    m = min(keep.shape[1], int(keep.sum(1).max()) + background)
    rows = []
    for c, free in zip(keep, background_mask, strict=True):
        obj = np.flatnonzero(c)
        bg = np.flatnonzero(free)
        extra = rng.choice(bg, size=min(len(bg), m - len(obj)), replace=False)
        rows.append(np.sort(np.concatenate([obj, extra])))
    return torch.as_tensor(np.stack(rows), dtype=torch.long)
