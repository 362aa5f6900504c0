"""Train toy-qwen on a CPU: `train(out_dir, seed)`.

The LLaVA toy's recipe (`vislens.toy.stages`), with its language model as the
starting point: the LLaVA toy's LM is copied in (`vislens.toy.transplant`),
A) adapts it to Qwen's token layout and mRoPE positions on oracle image tokens,
B) trains the vision tower + merger to produce those tokens, C) fine-tunes
everything on the questions with B's losses kept. Scenes, pools and questions
are the LLaVA toy's (`vislens.toy.data`); the Qwen pieces are the packed
encoder with mRoPE positions, the batched window attention that makes the
vision tower trainable on a CPU, and an attention guide that reads mRoPE (an
optional second one points the answer at the question's words, for training
the LM from scratch). Held-out scenes use world seed `EVAL_SEED + seed`.

The run itself is `vislens.toy.driver`, shared with the LLaVA toy; the `QWEN`
family here says what differs: transplanted LM, stage parameters, batches and
how a step's loss terms are composed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vislens.toy import qwen
from vislens.toy.driver import EVAL_SEED, Built, Family, Run, Stage, drive
from vislens.toy.qwen_attention import packed_vision_attention
from vislens.toy.qwen_data import QwenEncoder, grid_thw, head_positions, patchify, qa_batch
from vislens.toy.stages import Parts, answer_logits, attention_rows, vision_loss

__all__ = ["EVAL_SEED", "QWEN", "QwenRecipe", "build_encoder", "qwen_parts", "train"]
IMAGE_SIZE = 96


@dataclass
class QwenRecipe:
    """Every knob of a run; saved in the log so a run can be repeated."""

    spec: qwen.QwenToySpec = field(default_factory=qwen.QwenToySpec)
    # the LM starts from this LLaVA toy's LM ("toy": the shipped one; None: from scratch)
    init_lm: str | None = "toy"
    pool_size: int = 3000
    images_per_step: int = 16
    images_per_step_b: int = 24  # stage B is vision only: cheap, so larger batches
    targets_per_image: int = 2
    background_a: int | None = None  # A: object tokens + this many background ones; None: all
    steps_a: int = 200  # adapts the transplanted LM to Qwen's layout and positions
    lr_a: float = 1e-3
    steps_b: int = 1500
    lr_b: float = 2e-3
    steps_c: int = 400
    lr_c: float = 5e-4
    aux_weight: float = 1.0
    readout_weight: float = 0.2  # object-level word readout beside the dense loss (B, C)
    fresh_every: int = 60  # B and C draw new scenes, a new pool this often (0: fixed pool)
    guide_layer: int | None = 2  # object guide on this LM layer (A and C); None: off
    keyword_layer: int | None = None  # question-word guide on this layer; None: off
    guide_heads: int = 1
    guide_weight: float = 1.0
    warmup: int = 50
    probe_every: int = 100
    eval_scenes: int = 100
    threads: int = 1  # on the shared 2-core CPU one thread is faster than two
    save_every: int = 100  # steps between resumable states (and one at each stage end)


class AttentionGuide:
    """Auxiliary loss teaching `heads` heads of one layer where to look.

    The LLaVA toy's idea, written for any token layout and both hops of the
    lookup: with `target="object"`, every position that predicts an answer word
    about object k should attend to k's image tokens (found by id, not by
    offset); with `target="keyword"`, it should attend to the question's own
    attribute words (the query the next layer needs). Without it the route
    from the answer to the right image tokens forms far too slowly for a CPU
    budget. Queries and keys are recomputed from the layer's saved inputs with
    the model's own rotary tables, so mRoPE is respected.
    """

    def __init__(self, attention: torch.nn.Module, image_id: int, heads: int = 1,
                 target: str = "object"):
        if target not in ("object", "keyword"):
            raise ValueError(f"target must be 'object' or 'keyword', not {target!r}")
        self.attention, self.image_id, self.heads, self.target = attention, image_id, heads, target
        self.saved: dict = {}
        self.handle = attention.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, _module, args, kwargs):
        self.saved = {"hidden": kwargs.get("hidden_states", args[0] if args else None),
                      "rope": kwargs["position_embeddings"]}

    def remove(self) -> None:
        self.handle.remove()

    def _where(self, batch: dict, bi: torch.Tensor, ti: torch.Tensor, t: int) -> torch.Tensor:
        if self.target == "keyword":
            return batch["keyword"][bi, ti].float()
        image = batch["input_ids"] == self.image_id  # [B, T]
        obj = (batch["cov"][bi, batch["focus"][bi, ti]] > 0).float()  # [N, M]
        where = torch.zeros(len(bi), t)
        where[image[bi]] = obj.reshape(-1)
        return where

    def loss(self, batch: dict) -> torch.Tensor:
        hidden, rope = self.saved["hidden"], self.saved["rope"]
        want = batch["focus"] >= 0
        if self.target == "keyword":
            want &= batch["keyword"].any(-1)
        bi, ti = torch.nonzero(want, as_tuple=True)
        if len(bi) == 0:
            return hidden.new_zeros(())
        probs = attention_rows(self.attention, hidden, rope, batch["attention_mask"], bi, ti,
                               self.heads)
        where = self._where(batch, bi, ti, hidden.shape[1]).to(probs.dtype)
        mass = (probs * where[:, None]).sum(-1)
        return -(mass + 1e-6).log().mean()


def qwen_parts(model, processor) -> Parts:
    """The stage interface for a `Qwen2_5_VLForConditionalGeneration` with 96 px scenes."""
    ip = processor.image_processor

    def image_features(pixels: torch.Tensor) -> torch.Tensor:
        grid = grid_thw(pixels.shape[0], pixels.shape[2], pixels.shape[3], ip.patch_size)
        with packed_vision_attention(model):
            out = model.model.get_image_features(patchify(pixels, ip), grid, return_dict=True)
        return torch.stack(list(out.pooler_output))

    lm = model.model.language_model
    return Parts(lm=lm, head=model.lm_head, embed=lm.embed_tokens,
                 image_features=image_features,
                 vision_params=list(model.model.visual.parameters()))


def build_encoder(model, processor, spec: qwen.QwenToySpec) -> QwenEncoder:
    cells = IMAGE_SIZE // (spec.patch_size * spec.merge_size)
    grid = [1, IMAGE_SIZE // spec.patch_size, IMAGE_SIZE // spec.patch_size]
    tok = processor.tokenizer
    return QwenEncoder(tok, cells * cells, head_positions(model, tok, cells * cells, grid))


def qwen_stages(run: Run) -> list[Stage]:
    """A trains the LM with the oracle head; B the vision side; C the LM and vision side
    (the oracle head stays as A left it)."""
    r, parts = run.recipe, run.parts
    lm = list(dict.fromkeys([*parts.lm.parameters(), *parts.head.parameters()]))
    return [Stage("A", r.steps_a, r.lr_a, lm + list(run.oracle.parameters()),
                  r.images_per_step, vision=False),
            Stage("B", r.steps_b, r.lr_b, parts.vision_params, r.images_per_step_b, vision=True),
            Stage("C", r.steps_c, r.lr_c, lm + parts.vision_params, r.images_per_step,
                  vision=True)]


def qwen_batch_options(recipe: QwenRecipe, stage: str, step: int, steps: int) -> dict:
    return {"background": recipe.background_a if stage == "A" else None}


def qwen_loss(run: Run, stage: Stage, batch: dict) -> tuple[torch.Tensor, dict]:
    """Every term logged on its own; computed and summed in the order toy-qwen was
    trained with (bit for bit)."""
    r, parts, oracle = run.recipe, run.parts, run.oracle
    terms: dict[str, torch.Tensor] = {}
    if stage.name == "B":
        terms["vision"] = vision_loss(parts, oracle, batch,
                                      parts.image_features(batch["pixels"]), run.readout,
                                      r.readout_weight)
    else:
        if stage.name == "A":
            tokens = oracle(batch, parts.embed.weight)
        else:
            tokens = parts.image_features(batch["pixels"])
            terms["vision"] = r.aux_weight * vision_loss(
                parts, oracle, batch, tokens, run.readout, r.readout_weight)
        logits, labels, _ = answer_logits(parts, batch, tokens, run.image_id)
        terms["qa"] = F.cross_entropy(logits, labels)
        for guide in run.guides:
            terms[f"guide_{guide.target}"] = r.guide_weight * guide.loss(batch)
    return sum(terms.values()), terms


def _build(recipe: QwenRecipe, seed: int) -> Built:
    spec = recipe.spec
    processor = qwen.build_processor(spec)
    model = qwen.build_model(spec, seed=seed)
    if recipe.init_lm:
        from vislens.toy.build import TOY_DIR
        from vislens.toy.transplant import transplant_lm

        transplant_lm(model, processor.tokenizer,
                      TOY_DIR if recipe.init_lm == "toy" else recipe.init_lm)
    return Built(model, processor, qwen_parts(model, processor),
                 build_encoder(model, processor, spec), model.config.image_token_id,
                 IMAGE_SIZE // (spec.patch_size * spec.merge_size))


def _guides(recipe: QwenRecipe, parts: Parts, image_id: int) -> list[AttentionGuide]:
    guides = []
    for layer, target in ((recipe.keyword_layer, "keyword"), (recipe.guide_layer, "object")):
        if layer is not None and recipe.guide_weight > 0:
            guides.append(AttentionGuide(parts.lm.layers[layer].self_attn, image_id,
                                         recipe.guide_heads, target))
    return guides


def _save(model, processor, work: Path, out: Path) -> Path:
    return qwen.save(model, processor, out)


QWEN = Family(name="qwen", work_suffix=".stages",
              title="toy-qwen (A: LM on oracle tokens, B: vision, C: joint)",
              build=_build, guides=_guides, stages=qwen_stages, qa_batch=qa_batch,
              batch_options=qwen_batch_options, loss=qwen_loss, save=_save,
              replaceable=qwen.TOY_QWEN_DIR)


def train(out_dir: str | Path = qwen.TOY_QWEN_DIR, seed: int = 0,
          recipe: QwenRecipe | None = None, progress: bool = True,
          log_path: str | Path | None = None, resume: str | Path | None = None) -> dict:
    """Train toy-qwen into `out_dir`; returns the training summary (also saved).

    `out_dir` gets the Hugging Face checkpoint plus `training_log.json` and
    `loss.png`. `log_path` (optional) receives one JSON line per step as it
    goes, for watching long runs. The work directory `<out_dir>.stages/` keeps a
    resumable state (`vislens.toy.training_state`): calling again with the same seed and
    recipe continues an interrupted run from its last saved step (and cuts
    `log_path` back to that step). Each stage also leaves `stage_<X>.pt` there;
    `resume=<such a file>` starts from it and runs only the stages after X.
    """
    return drive(QWEN, out_dir, seed, recipe or QwenRecipe(), progress, log_path, resume)
