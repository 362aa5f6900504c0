"""Reproduce the shipped toy VLM from scratch on a CPU: `train(out_dir, seed)`.

Recipe (see `stages.py` for why): A) LM on oracle image tokens, B) vision tower
+ projector regress the oracle tokens, C) end-to-end fine-tune on the questions.
Training scenes come from world seed `seed`; the held-out score uses world seed
`EVAL_SEED + seed`, so no evaluated scene was ever trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.progress import progress_bar
from vislens.toy.build import IMAGE, ToySpec, build_model, build_processor
from vislens.toy.checks import final_checks
from vislens.toy.curves import plot_training
from vislens.toy.data import Encoder, SceneStream, make_pool, normalise_pixels, qa_batch
from vislens.toy.resume import RunState, atomic_lines, run_identity
from vislens.toy.stages import (
    AttentionGuide,
    OracleHead,
    Parts,
    Readout,
    load_stage_state,
    probe,
    save_stage_state,
    stage_a_step,
    stage_c_step,
    stage_optimizer,
    vision_loss,
)

EVAL_SEED = 100_000


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


def train(out_dir: str | Path, seed: int = 0, recipe: Recipe | None = None,
          progress: bool = True, resume: str | Path | None = None) -> dict:
    """Train a toy from scratch into `out_dir`; returns the training summary (also saved).

    The work directory `<out_dir>.partial` keeps a resumable state
    (`vislens.toy.resume`): calling again with the same seed and recipe continues
    an interrupted run from its last saved step. Each stage also leaves
    `stage_<X>.pt` (model + oracle state) there; `resume=<such a file>` starts
    from it and runs only the stages after X.
    """
    recipe = recipe or Recipe()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass a new --out directory")
    tmp = out.with_name(out.name + ".partial")
    state = RunState(tmp, run_identity("llava", seed, recipe), resume, recipe.save_every)
    saved = state.load()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = recipe.spec
    processor = build_processor(spec)
    model = build_model(spec, seed=seed)
    parts = llava_parts(model, processor)
    vocab = processor.tokenizer.get_vocab()
    image_id = vocab[IMAGE]
    encoder = Encoder(processor.tokenizer, spec.grid ** 2)
    oracle = OracleHead(spec.lm_hidden)
    pool = make_pool(recipe.pool_size, seed, spec.grid, vocab)
    held = make_pool(64, EVAL_SEED + seed, spec.grid, vocab)
    log: dict = {"seed": seed, "recipe": asdict(recipe), "steps": [], "probes": []}

    stream = SceneStream(seed, spec.grid, vocab, start=recipe.pool_size,
                         size=recipe.fresh_every * recipe.images_per_step_b,
                         every=max(1, recipe.fresh_every))

    def draw(stage: str, step: int, steps: int):
        size = recipe.images_per_step_b if stage == "B" else recipe.images_per_step
        fresh = stage in ("B", "C") and recipe.fresh_every
        source = stream.at(step) if fresh else pool
        idx = rng.integers(len(source.samples), size=size)
        background, peaks, keep = None, False, None
        if stage == "A2":
            background, keep = 8, recipe.keep_a2
        if stage == "A":
            frac = step / max(1, steps)
            if frac < recipe.curriculum_a[0]:
                background, peaks = 2, True
            elif frac < recipe.curriculum_a[1]:
                background = 8
        return qa_batch(source, idx, encoder, rng, targets=recipe.targets_per_image,
                        background=background, peaks_only=peaks, keep=keep)

    guides = [AttentionGuide(parts.lm.layers[0].self_attn, key="word_focus"),
              AttentionGuide(parts.lm.layers[recipe.guide_layer].self_attn, key="focus")]
    lm_params = list(parts.lm.parameters()) + list(oracle.parameters())
    stages = [
        ("A", recipe.steps_a, lm_params, recipe.lr_a),
        ("A2", recipe.steps_a2, lm_params, recipe.lr_a2),
        ("B", recipe.steps_b, parts.vision_params, recipe.lr_b),
        ("C", recipe.steps_c, lm_params + parts.vision_params, recipe.lr_c),
    ]
    state.bind(model, oracle, rng, stream, log)
    if saved is not None:
        done = state.restore(saved)
    else:
        done = load_stage_state(resume, model, oracle) if resume is not None else set()
    tmp.mkdir(parents=True, exist_ok=True)
    # the probe log holds what the saved state has done, nothing from after it
    atomic_lines(tmp / "probes.jsonl", log["probes"])
    if saved is None:  # from now on a rerun resumes, and other options are refused
        state.save(done)

    def checkpoint(stage: str, step: int, steps: int, optimizer, scheduler) -> None:
        if state.due(step, steps):
            state.save(done, stage, step, optimizer, scheduler)
    bar = progress_bar(info=True) if progress else None
    if bar:
        bar.start()
    try:
        for name, steps, params, lr in stages:
            if steps <= 0 or name in done:
                continue
            within = saved if saved is not None and saved["stage"] == name else None
            _train_stage(name, steps, params, lr, recipe, parts, oracle, draw, image_id,
                         held, encoder, log, bar, guides, Readout.from_vocab(vocab),
                         tmp / "probes.jsonl", within, checkpoint)
            done.add(name)
            save_stage_state(tmp / f"stage_{name}.pt", model, oracle, done)
            state.save(done)
    finally:
        if bar:
            bar.stop()
        for guide in guides:
            guide.remove()
    train_seconds = state.seconds()
    model.eval()
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    scenes = shapesworld.generate(recipe.eval_scenes, seed=EVAL_SEED + seed)
    summary = final_checks(model, processor, scenes)
    log.update(summary)
    log["train_seconds"] = round(train_seconds, 1)
    log["parameters"] = sum(p.numel() for p in model.parameters())
    (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    plot_training(log, tmp / "loss.png",
                  "toy VLM (A: LM on oracle tokens, B: vision, C: joint)")
    for leftover in tmp.glob("stage_*.pt"):
        leftover.unlink()
    state.discard()
    os.replace(tmp, out) if not out.exists() else _move_into(tmp, out)
    return log


def _move_into(tmp: Path, out: Path) -> None:
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


def _train_stage(name, steps, params, lr, recipe, parts, oracle, draw, image_id, held,
                 encoder, log, bar, guides, readout: Readout,
                 log_file: Path | None = None, saved: dict | None = None,
                 checkpoint=None) -> None:
    """Run one stage; `saved` (a state saved inside this stage) continues it from its step,
    and `checkpoint(stage, steps_done, steps, optimizer, scheduler)` follows every step."""
    optimizer, sched, start = stage_optimizer(params, lr, recipe.warmup, steps, saved)
    task = (bar.add_task(f"stage {name}", total=steps, completed=start, info="")
            if bar else None)
    use_vision = name not in ("A", "A2")
    for step in range(start, steps):
        batch = draw(name, step, steps)
        aux = None
        if name in ("A", "A2"):
            loss = stage_a_step(parts, oracle, batch, image_id)
        elif name == "B":
            tokens = parts.image_features(batch["pixels"])
            loss = vision_loss(parts, oracle, batch, tokens, readout, recipe.readout_weight)
        else:
            loss, aux = stage_c_step(parts, oracle, batch, image_id, recipe.aux_weight,
                                     readout, recipe.readout_weight)
        if name != "B" and recipe.guide_weight > 0:
            loss = loss + recipe.guide_weight * sum(g.loss(batch) for g in guides)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        row = {"stage": name, "step": step, "loss": round(loss.item(), 5)}
        if aux is not None:
            row["vision"] = round(aux.item(), 5)
        log["steps"].append(row)
        info = f"loss {loss.item():.3f}"
        if (step + 1) % recipe.probe_every == 0 or step + 1 == steps:
            acc = probe(parts, oracle, held, encoder, image_id, use_vision)
            log["probes"].append({"stage": name, "step": step + 1, **acc})
            if log_file is not None:
                with open(log_file, "a") as f:
                    f.write(json.dumps(log["probes"][-1]) + "\n")
            info += " | " + " ".join(f"{k[:4]} {v:.2f}" for k, v in acc.items())
        if bar:
            bar.update(task, advance=1, info=info)
        if checkpoint is not None:
            checkpoint(name, step + 1, steps, optimizer, sched)
