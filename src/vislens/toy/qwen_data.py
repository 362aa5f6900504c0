"""Training batches for toy-qwen in the exact token layout of its chat template.

Same packing as the LLaVA toy's `vislens.toy.data.Encoder` (several question
blocks per image behind one image prefix, a 4-D mask, so `qa_batch` and the
shared stages work unchanged), with what is Qwen specific: the token layout and
the mRoPE positions. Positions are taken
from the model's own `get_rope_index` on the single-question sequence, so a
packed block sees exactly the positions the unpacked chat-template sequence
gets (tests check both the layout and the positions against the processor).
"""

from __future__ import annotations

import numpy as np
import torch

from vislens.data.samples import SETTINGS
from vislens.toy.data import IGNORE, Encoder, Pool, answer_focus, scene_questions
from vislens.toy.qwen import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    PAD,
    VISION_END,
    VISION_START,
)


class QwenEncoder(Encoder):
    """`<|im_start|> user <|vision_start|> <|image_pad|>*P <|vision_end|>` then blocks
    `prompt <|im_end|> <|im_start|> assistant prefix answer <|im_end|>`."""

    def __init__(self, tokenizer, n_image_tokens: int, head_positions: torch.Tensor):
        self.vocab = tokenizer.get_vocab()
        self.eos = self.vocab[IM_END]
        self.pad = self.vocab[PAD]
        self.image = self.vocab[IMAGE_PAD]
        self.n_image = n_image_tokens
        self.head_positions = head_positions  # [3, len(prefix())] from get_rope_index
        if head_positions.shape[-1] != len(self.prefix()):
            raise ValueError("head_positions must cover the image prefix exactly")
        self.text_start = int(head_positions.max()) + 1

    def prefix(self) -> list[int]:
        v = self.vocab
        return [v[IM_START], v["user"], v[VISION_START]] + [self.image] * self.n_image + [
            v[VISION_END]]

    def block(self, prompt: str, answer_prefix: str, answer: str,
              focus: list[int] | None = None) -> tuple[list[int], list[int], list[int]]:
        """Ids, labels (labels[t] is the token after t) and focus of one question block.

        `focus[j]` names the instance answer word j is about (-1: none); it sits at
        the position that predicts that word, where the attention guide reads it.
        """
        v = self.vocab
        ctx = self.words(prompt) + [v[IM_END], v[IM_START], v["assistant"]] \
            + self.words(answer_prefix)
        target = self.words(answer) + [self.eos]
        ids = ctx + target
        labels = [IGNORE] * (len(ctx) - 1) + target + [IGNORE]
        about = list(focus or [])[:len(target)]
        about += [-1] * (len(target) - len(about))
        return ids, labels, [-1] * (len(ctx) - 1) + about + [-1]

    def keywords(self, block_ids: list[int]) -> list[int]:
        """Offsets of the question's attribute words (colors, shapes) inside a block."""
        attrs = self.attribute_ids
        end = block_ids.index(self.eos)
        return [j for j in range(end) if block_ids[j] in attrs]

    @property
    def attribute_ids(self) -> set[int]:
        from vislens.data import shapesworld

        return {self.vocab[w] for w in (*shapesworld.SHAPES, *shapesworld.COLORS)}

    def pack(self, blocks_per_image: list[list[tuple[list[int], list[int], list[int]]]],
             patches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Right-padded packed batch: mRoPE `position_ids` [3, B, L], boolean 4-D mask.

        `patches` [B, M] (sorted image-token indices) keeps only those image
        tokens, each with the position it has in the full sequence (a cheap
        stage-A batch, as in the LLaVA toy).
        """
        v = self.vocab
        n_keep = self.n_image if patches is None else patches.shape[1]
        head = [v[IM_START], v["user"], v[VISION_START]] + [self.image] * n_keep + [v[VISION_END]]
        n_head = len(head)
        b = len(blocks_per_image)
        n = n_head + max(sum(len(blk[0]) for blk in blocks) for blocks in blocks_per_image)
        ids = torch.full((b, n), self.pad, dtype=torch.long)
        labels = torch.full((b, n), IGNORE, dtype=torch.long)
        pos = torch.zeros((3, b, n), dtype=torch.long)
        block = torch.full((b, n), -1, dtype=torch.long)  # running block number, for scoring
        focus = torch.full((b, n), -1, dtype=torch.long)
        keyword = torch.zeros((b, n, n), dtype=torch.bool)  # [query, key]: question words
        mask = torch.eye(n, dtype=torch.bool).repeat(b, 1, 1)
        causal_head = torch.ones(n_head, n_head, dtype=torch.bool).tril()
        full = torch.arange(self.n_image)
        for i, blocks in enumerate(blocks_per_image):
            kept = full if patches is None else patches[i]
            take = torch.cat([torch.arange(3), kept + 3, torch.tensor([self.n_image + 3])])
            ids[i, :n_head] = torch.tensor(head)
            pos[:, i, :n_head] = self.head_positions[:, take]
            mask[i, :n_head, :n_head] = causal_head
            at = n_head
            for k, (block_ids, block_labels, block_focus) in enumerate(blocks):
                m = len(block_ids)
                focus[i, at:at + m] = torch.tensor(block_focus)
                asks = [at + j for j in self.keywords(block_ids)]
                if asks and block_ids[0] != self.vocab.get("describe"):
                    rows = at + torch.nonzero(torch.tensor(block_focus) >= 0).flatten()
                    keyword[i, rows[:, None], torch.tensor(asks)[None, :]] = True
                block[i, at:at + m] = k + i * 1000
                ids[i, at:at + m] = torch.tensor(block_ids)
                labels[i, at:at + m] = torch.tensor(block_labels)
                pos[:, i, at:at + m] = torch.arange(self.text_start, self.text_start + m)
                mask[i, at:at + m, :n_head] = True
                mask[i, at:at + m, at:at + m] = torch.ones(m, m, dtype=torch.bool).tril()
                at += m
        return {"input_ids": ids, "labels": labels, "position_ids": pos,
                "attention_mask": mask[:, None], "block": block, "focus": focus,
                "keyword": keyword,
                "mm_token_type_ids": (ids == self.image).long()}


def head_positions(model, tokenizer, n_image_tokens: int, grid_thw: list[int]) -> torch.Tensor:
    """mRoPE positions of the image prefix, from the model's own `get_rope_index`."""
    enc = QwenEncoder.__new__(QwenEncoder)
    enc.vocab, enc.image, enc.n_image = tokenizer.get_vocab(), tokenizer.convert_tokens_to_ids(
        IMAGE_PAD), n_image_tokens
    ids = torch.tensor([enc.prefix()])
    types = (ids == enc.image).long()
    pos, _ = model.model.get_rope_index(ids, types, torch.tensor([grid_thw]))
    return pos[:, 0]


def patchify(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> the processor's `pixel_values` [B*h*w, C*T*p*p], no resize.

    Same arithmetic as the PIL Qwen2-VL image processor (rescale, normalise,
    merge-ordered patches, frame repeated `temporal_patch_size` times) without
    a PIL round trip per image; a test checks equality with the processor.
    """
    ip = image_processor
    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    b, c, h, w = pixels.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"{h}x{w} images are not multiples of {p * m} px; use the processor")
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float32)[None, :, None, None]
    x = (pixels.float() * ip.rescale_factor - mean) / std
    gh, gw = h // p, w // p
    x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(b, gh // m, gw // m, m, m, c, t, p, p)
    return x.reshape(b * gh * gw, c * t * p * p)


def grid_thw(n: int, height: int, width: int, patch: int) -> torch.Tensor:
    return torch.tensor([[1, height // patch, width // patch]] * n, dtype=torch.long)


def keep_patches(cov: torch.Tensor, background: int, rng: np.random.Generator) -> torch.Tensor:
    """[B, M] sorted image-token indices: every object token, then background up to M."""
    covered = (cov.sum(1) > 0).numpy()
    m = min(cov.shape[2], int(covered.sum(1).max()) + background)
    rows = []
    for c in covered:
        obj, bg = np.flatnonzero(c), np.flatnonzero(~c)
        extra = rng.choice(bg, size=min(len(bg), m - len(obj)), replace=False)
        rows.append(np.sort(np.concatenate([obj, extra])))
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def qa_batch(pool: Pool, idx: np.ndarray, encoder: QwenEncoder, rng: np.random.Generator,
             targets: int = 2, settings: tuple[str, ...] = SETTINGS,
             background: int | None = None) -> dict[str, torch.Tensor]:
    """Packed batch of all questions about scenes `idx`, with their oracle inputs.

    `background=k` keeps only object tokens plus k random background ones per
    image (stage A: empty background carries nothing to learn).
    """
    blocks = []
    for i in idx:
        sample = pool.samples[int(i)]
        qs = scene_questions(sample, rng, targets, settings)
        blocks.append([encoder.block(q.prompt, q.answer_prefix, q.answer,
                                     answer_focus(sample, q)) for q in qs])
    t = torch.as_tensor(idx, dtype=torch.long)
    cov = pool.cov[t]
    patches = None
    if background is not None:
        patches = keep_patches(cov, background, rng)
        cov = torch.gather(cov, 2, patches[:, None, :].expand(-1, cov.shape[1], -1))
    out = encoder.pack(blocks, patches)
    out.update(cov=cov, colors=pool.colors[t], shapes=pool.shapes[t], pixels=pool.pixels[t])
    return out
