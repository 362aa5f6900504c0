"""Reproduce the shipped toy VLM from scratch on a CPU: `train(out_dir, seed)`.

Recipe (see `stages.py` for why): A) LM on oracle image tokens, B) vision tower
+ projector regress the oracle tokens, C) end-to-end fine-tune on the questions.
Training scenes come from world seed `seed`; the held-out score uses world seed
`EVAL_SEED + seed`, so no evaluated scene was ever trained on.

The run itself (stages, optimizer, probes, resume, publishing) is
`vislens.toy.driver`, shared with toy-qwen; this module holds only what is
LLaVA's: the `LLAVA` family (model, parameters per stage, batches, loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vislens.toy.build import IMAGE, ToySpec, build_model, build_processor
from vislens.toy.data import Encoder, normalise_pixels, qa_batch
from vislens.toy.driver import EVAL_SEED, Built, Family, Run, Stage, drive
from vislens.toy.stages import (
    AttentionGuide,
    Parts,
    stage_a_step,
    stage_c_step,
    vision_loss,
)

__all__ = ["EVAL_SEED", "LLAVA", "Recipe", "build_model", "llava_parts", "train"]


@dataclass
class Recipe:
    """Every knob of a training run; saved in the log so a run can be repeated."""

    spec: ToySpec = field(default_factory=ToySpec)
    pool_size: int = 2000
    images_per_step: int = 8
    images_per_step_b: int = 32  # stage B is vision only: cheap, so larger batches
    targets_per_image: int = 2
    # stage A curriculum, as fractions of steps_a: one patch per object (+2 background),
    # then every object patch (+8 background), then the full grid
    curriculum_a: tuple[float, float] = (0.5, 0.8)
    guide_weight: float = 1.0  # attention auxiliary losses (stages A and C)
    guide_layer: int = 2  # where the answer position is taught to look at the object
    steps_a: int = 1500
    lr_a: float = 3e-3
    # A2: more LM steps with most shape questions left out: a model that has learned to
    # read shapes is otherwise slow to learn to read colors from the same tokens (after
    # A alone, VQA from oracle tokens was 0.58, mostly red read as orange; after 300 A2
    # steps 0.70, after 1000 steps 1.00)
    steps_a2: int = 1000
    lr_a2: float = 1e-3
    keep_a2: dict = field(default_factory=lambda: {"vqa-shape": 0.3})
    steps_b: int = 1400
    lr_b: float = 3e-3
    steps_c: int = 1500
    lr_c: float = 5e-4
    aux_weight: float = 1.0
    readout_weight: float = 0.2  # object-level word readout beside the dense loss (B, C)
    fresh_every: int = 60  # B and C draw new scenes, a new pool this often (0: fixed pool)
    warmup: int = 50
    probe_every: int = 100
    eval_scenes: int = 100
    threads: int = 1  # one thread: on a shared 2-core CPU two threads run ~5x slower
    save_every: int = 100  # steps between resumable states (and one at each stage end)


def llava_parts(model, processor) -> Parts:
    """The stage interface for a `LlavaForConditionalGeneration` (CLS dropped, as LLaVA does)."""
    ip = processor.image_processor
    mean, std = list(ip.image_mean), list(ip.image_std)

    def image_features(pixels: torch.Tensor) -> torch.Tensor:
        feats = model.model.get_image_features(pixel_values=normalise_pixels(pixels, mean, std))
        feats = getattr(feats, "pooler_output", feats)
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats

    vision = list(model.model.vision_tower.parameters())
    vision += list(model.model.multi_modal_projector.parameters())
    return Parts(lm=model.model.language_model, head=model.lm_head,
                 embed=model.model.language_model.embed_tokens,
                 image_features=image_features, vision_params=vision)


def llava_stages(run: Run) -> list[Stage]:
    """A and A2 train the LM with the oracle head; B the vision side; C all of it."""
    r, parts = run.recipe, run.parts
    lm = list(parts.lm.parameters()) + list(run.oracle.parameters())
    return [Stage("A", r.steps_a, r.lr_a, lm, r.images_per_step, vision=False),
            Stage("A2", r.steps_a2, r.lr_a2, lm, r.images_per_step, vision=False),
            Stage("B", r.steps_b, r.lr_b, parts.vision_params, r.images_per_step_b, vision=True),
            Stage("C", r.steps_c, r.lr_c, lm + parts.vision_params, r.images_per_step,
                  vision=True)]


def llava_batch_options(recipe: Recipe, stage: str, step: int, steps: int) -> dict:
    """A's curriculum (few background patches first) and A2's left-out shape questions."""
    if stage == "A2":
        return {"background": 8, "peaks_only": False, "keep": recipe.keep_a2}
    background, peaks = None, False
    if stage == "A":
        frac = step / max(1, steps)
        if frac < recipe.curriculum_a[0]:
            background, peaks = 2, True
        elif frac < recipe.curriculum_a[1]:
            background = 8
    return {"background": background, "peaks_only": peaks, "keep": None}


def llava_loss(run: Run, stage: Stage, batch: dict) -> tuple[torch.Tensor, dict]:
    """The stage loss, summed in the order the shipped toy was trained with (bit for bit)."""
    r, parts, oracle = run.recipe, run.parts, run.oracle
    terms = {}
    if stage.name in ("A", "A2"):
        loss = stage_a_step(parts, oracle, batch, run.image_id)
    elif stage.name == "B":
        tokens = parts.image_features(batch["pixels"])
        loss = vision_loss(parts, oracle, batch, tokens, run.readout, r.readout_weight)
    else:
        loss, terms["vision"] = stage_c_step(parts, oracle, batch, run.image_id, r.aux_weight,
                                             run.readout, r.readout_weight)
    if stage.name != "B" and r.guide_weight > 0:
        loss = loss + r.guide_weight * sum(g.loss(batch) for g in run.guides)
    return loss, terms


def _build(recipe: Recipe, seed: int) -> Built:
    processor = build_processor(recipe.spec)
    model = build_model(recipe.spec, seed=seed)
    return Built(model, processor, llava_parts(model, processor),
                 Encoder(processor.tokenizer, recipe.spec.grid ** 2),
                 processor.tokenizer.get_vocab()[IMAGE], recipe.spec.grid)


def _guides(recipe: Recipe, parts: Parts, image_id: int) -> list[AttentionGuide]:
    # layer 0 points question words at their objects, `guide_layer` the answer
    return [AttentionGuide(parts.lm.layers[0].self_attn, key="word_focus"),
            AttentionGuide(parts.lm.layers[recipe.guide_layer].self_attn, key="focus")]


def _save(model, processor, work: Path, out: Path) -> Path:
    model.save_pretrained(work)
    processor.save_pretrained(work)
    return work  # the driver turns it into `out` once the log is in it


LLAVA = Family(name="llava", work_suffix=".partial",
               title="toy VLM (A: LM on oracle tokens, B: vision, C: joint)",
               build=_build, guides=_guides, stages=llava_stages, qa_batch=qa_batch,
               batch_options=llava_batch_options, loss=llava_loss, save=_save,
               save_before_checks=True)


def train(out_dir: str | Path, seed: int = 0, recipe: Recipe | None = None,
          progress: bool = True, resume: str | Path | None = None,
          log_path: str | Path | None = None) -> dict:
    """Train a toy from scratch into `out_dir`; returns the training summary (also saved).

    `out_dir` gets the Hugging Face checkpoint plus `training_log.json`,
    `probes.jsonl` and `loss.png`; `log_path` (optional) receives one JSON line
    per step as it goes. The work directory `<out_dir>.partial` keeps a
    resumable state (`vislens.toy.training_state`): calling again with the same seed and
    recipe continues an interrupted run from its last saved step. Each stage also
    leaves `stage_<X>.pt` (model + oracle state) there; `resume=<such a file>`
    starts from it and runs only the stages after X.
    """
    return drive(LLAVA, out_dir, seed, recipe or Recipe(), progress, log_path, resume)
