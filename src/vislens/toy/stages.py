"""The three training stages, written against a small interface so other toys reuse them.

A: the language model alone learns to answer from oracle image tokens (its own
   word embeddings placed at the objects' patches), which removes the hard,
   slow part of VLM training: the route from question words to image tokens.
B: the vision side (tower + projector) regresses those oracle tokens per patch
   with the LM frozen; a dense target converges in a few hundred steps.
C: everything is fine-tuned end to end on the questions, the dense loss kept
   as an auxiliary so image tokens stay in the LM's word space.

`Parts` is all a stage needs from a family: the LM body and head, the image
token id, and a function from pixels to one feature per oracle patch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vislens.toy.data import IGNORE, Encoder, Pool, qa_batch
from vislens.toy.oracle import oracle_tokens
from vislens.toy.training_state import atomic_save


class AttentionGuide:
    """Auxiliary loss that teaches one head where to look: the object an answer is about.

    Without it the route from the answer position to the right image tokens forms
    far too slowly on a CPU budget (attention starts uniform over ~144 tokens and
    each token gets a tiny share of the gradient). A pre-hook keeps the chosen
    layer's attention inputs; the loss is -log(attention mass that the guided heads,
    at positions predicting an answer word, put on that object's patches).
    """

    def __init__(self, attention: torch.nn.Module, heads: int = 1, key: str = "focus"):
        self.attention = attention
        self.heads = heads
        self.key = key  # which batch field names the positions and their objects
        self.saved: dict = {}
        self.handle = attention.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, _module, args, kwargs):
        self.saved = dict(kwargs)
        if args:
            self.saved["hidden_states"] = args[0]

    def remove(self) -> None:
        self.handle.remove()

    def loss(self, batch: dict) -> torch.Tensor:
        hidden = self.saved["hidden_states"]
        focus = batch[self.key]
        bi, ti = torch.nonzero(focus >= 0, as_tuple=True)
        if len(bi) == 0:
            return hidden.new_zeros(())
        probs = attention_rows(self.attention, hidden, self.saved["position_embeddings"],
                               batch["attention_mask"], bi, ti, self.heads)
        obj = batch["cov"][bi, focus[bi, ti]] > 0  # [N, M] over the image tokens
        where = torch.zeros(len(bi), hidden.shape[1], dtype=probs.dtype)
        where[:, 1:1 + obj.shape[1]] = obj.to(probs.dtype)
        mass = (probs * where[:, None]).sum(-1)
        return -(mass + 1e-6).log().mean()


def attention_rows(attention: torch.nn.Module, hidden: torch.Tensor, rope: tuple,
                   mask: torch.Tensor, bi: torch.Tensor, ti: torch.Tensor,
                   heads: int) -> torch.Tensor:
    """Attention probabilities [N, heads, T] of the first `heads` heads at query positions
    (bi, ti), recomputed from the layer's inputs with its own rotary tables (so Llama RoPE
    and Qwen's mRoPE alike) and the boolean 4-D `mask` of a packed batch."""
    cos, sin = rope
    dh = attention.head_dim
    b, t, _ = hidden.shape
    q = attention.q_proj(hidden[bi, ti]).view(len(bi), -1, dh)[:, :heads]
    k = attention.k_proj(hidden).view(b, t, -1, dh)[:, :, :heads]
    q = q * cos[bi, ti][:, None] + _rotate_half(q) * sin[bi, ti][:, None]
    k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
    scores = torch.einsum("nhd,nthd->nht", q, k[bi]) * attention.scaling
    visible = mask[:, 0][bi, ti]  # [N, T]
    return scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Parts:
    lm: torch.nn.Module  # decoder body: (inputs_embeds, attention_mask, position_ids) -> hidden
    head: torch.nn.Module  # hidden -> vocabulary logits
    embed: torch.nn.Embedding  # the LM's input embeddings (tied to `head` in the toy)
    image_features: Callable[[torch.Tensor], torch.Tensor]  # uint8 pixels -> [B, P, D]
    vision_params: list[torch.nn.Parameter]


class OracleHead(torch.nn.Module):
    """Learned pieces of the oracle tokens: background vector and an overall scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.background = torch.nn.Parameter(torch.randn(dim) * 0.02)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, batch: dict, embed: torch.Tensor) -> torch.Tensor:
        return oracle_tokens(batch["cov"], batch["colors"], batch["shapes"], embed,
                             self.background, self.scale)


def answer_logits(parts: Parts, batch: dict, image_tokens: torch.Tensor, image_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at labelled positions only (the head is the cost we can skip elsewhere)."""
    ids = batch["input_ids"]
    emb = parts.embed(ids)
    where = (ids == image_id)[..., None]
    emb = emb.masked_scatter(where, image_tokens.to(emb.dtype))
    hidden = parts.lm(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"]).last_hidden_state
    sel = batch["labels"] != IGNORE
    return parts.head(hidden[sel]), batch["labels"][sel], sel


def exact_match(logits: torch.Tensor, labels: torch.Tensor, sel: torch.Tensor,
                batch: dict) -> float:
    """Share of question blocks whose every answer token is the argmax (teacher forced)."""
    blocks = batch["block"][sel]
    wrong = set(blocks[logits.argmax(-1) != labels].tolist())
    total = set(blocks.tolist())
    return 1.0 - len(wrong) / max(1, len(total))


def schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up then cosine decay to 10%: fast early progress, a quiet finish."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stage_optimizer(params, lr: float, warmup: int, steps: int, saved: dict | None = None):
    """(optimizer, scheduler, first step) of a stage; `saved` (a state saved inside the
    stage) continues both from its step, so a resumed stage follows the same schedule."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = schedule(optimizer, min(warmup, steps // 4 + 1), steps)
    if saved is None:
        return optimizer, sched, 0
    optimizer.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return optimizer, sched, saved["step"]


def probe(parts: Parts, oracle: OracleHead, pool: Pool, encoder: Encoder, image_id: int,
          use_vision: bool, n: int = 48, seed: int = 1,
          make_batch: Callable[..., dict] = qa_batch) -> dict[str, float]:
    """Teacher-forced exact match per setting on a fixed slice of a held-out pool.

    `make_batch` builds a family's packed batch (`qa_batch` of its data module).
    """
    rng = np.random.default_rng(seed)
    idx = np.arange(min(n, len(pool.samples)))
    out = {}
    with torch.no_grad():
        for setting in ("generative", "polling", "vqa"):
            batch = make_batch(pool, idx, encoder, rng, settings=(setting,))
            tokens = (parts.image_features(batch["pixels"]) if use_vision
                      else oracle(batch, parts.embed.weight))
            logits, labels, sel = answer_logits(parts, batch, tokens, image_id)
            out[setting] = round(exact_match(logits, labels, sel, batch), 4)
    return out


def stage_a_step(parts: Parts, oracle: OracleHead, batch: dict, image_id: int) -> torch.Tensor:
    tokens = oracle(batch, parts.embed.weight)
    logits, labels, _ = answer_logits(parts, batch, tokens, image_id)
    return F.cross_entropy(logits, labels)


READOUT_SCALE = 5.0  # logit scale of the word readout (dot products are ~1 at init)


@dataclass
class Readout:
    """Token ids of the attribute words a pooled object token must read as."""

    colors: torch.Tensor  # [C] ids of the color words
    shapes: torch.Tensor  # [S] ids of the shape words

    @classmethod
    def from_vocab(cls, vocab: dict[str, int]) -> Readout:
        from vislens.data import shapesworld

        return cls(torch.tensor([vocab[w] for w in shapesworld.COLORS]),
                   torch.tensor([vocab[w] for w in shapesworld.SHAPES]))


def readout_loss(tokens: torch.Tensor, batch: dict, embed: torch.Tensor,
                 readout: Readout) -> torch.Tensor:
    """Cross-entropy of every object's coverage-pooled image token against the color
    and the shape words (dot product with the LM's embeddings, the oracle's own code).

    Why: the dense regression weighs every patch alike, so a small object's few
    patches barely count and its shape stayed wrong for a quarter of small objects
    (star vs cross); scoring the pooled object as a word puts the weight where the
    answers need it (held-out shape readout 0.85 -> 0.99 in 1,400 steps).
    """
    cov = batch["cov"]
    weights = cov / cov.sum(-1, keepdim=True).clamp(min=1e-6)
    pooled = torch.einsum("bkp,bpd->bkd", weights, tokens)
    present = batch["colors"] >= 0
    pooled = pooled[present]
    loss = pooled.new_zeros(())
    for ids, truth in ((readout.colors, batch["colors"]), (readout.shapes, batch["shapes"])):
        logits = READOUT_SCALE * pooled @ embed[ids].T
        target = (truth[present][:, None] == ids[None, :]).float().argmax(-1)
        loss = loss + F.cross_entropy(logits, target)
    return loss


def vision_loss(parts: Parts, oracle: OracleHead, batch: dict, tokens: torch.Tensor,
                readout: Readout | None, readout_weight: float) -> torch.Tensor:
    """Dense regression of the oracle tokens (targets detached: the LM defines them),
    plus the object-level word readout."""
    embed = parts.embed.weight
    with torch.no_grad():
        target = oracle(batch, embed)
    loss = F.mse_loss(tokens, target) / target.pow(2).mean().clamp(min=1e-8)
    if readout is not None and readout_weight > 0:
        loss = loss + readout_weight * readout_loss(tokens, batch, embed.detach(), readout)
    return loss


def stage_c_step(parts: Parts, oracle: OracleHead, batch: dict, image_id: int,
                 aux_weight: float, readout: Readout | None = None,
                 readout_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = parts.image_features(batch["pixels"])
    logits, labels, _ = answer_logits(parts, batch, tokens, image_id)
    loss = F.cross_entropy(logits, labels)
    aux = vision_loss(parts, oracle, batch, tokens, readout, readout_weight)
    return loss + aux_weight * aux, aux


def save_stage_state(path: Path, model: torch.nn.Module, oracle: OracleHead,
                     done: set[str]) -> None:
    """What `resume` needs to restart after a stage: weights, oracle, finished stages."""
    atomic_save({"model": model.state_dict(), "oracle": oracle.state_dict(),
                 "stages": sorted(done)}, Path(path))


def load_stage_state(path: str | Path, model: torch.nn.Module, oracle: OracleHead) -> set[str]:
    """Load a `stage_<X>.pt` into `model` and `oracle`; returns the finished stages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no stage checkpoint at {path}; pass a stage_<X>.pt that "
                                "a train-toy run left in its work directory")
    state = torch.load(path, map_location="cpu")
    model.load_state_dict(state["model"])
    oracle.load_state_dict(state["oracle"])
    return set(state["stages"])
