"""The one stage driver both toy trainers run: `drive(family, out_dir, seed, recipe, ...)`.

The LLaVA toy (`train.py`) and toy-qwen (`qwen_train.py`) follow one recipe
(`stages.py`): stages of AdamW with warm-up and cosine decay, probes on held-out
scenes, resumable states, a final check and a published checkpoint. They
differ in what a `Family` says: how the model is built, which parameters each
stage trains, how a batch is packed and what a step's loss is made of.
Keeping the run itself here means a fix to resuming, logging or checkpointing
reaches both toys at once.

Order matters for reproducibility: every random draw (model init, oracle head,
scene pools, batches) happens in the order the shipped toys were trained with,
and each family composes its loss exactly as it did then, so a retrain with the
same seed and recipe gives the same weights bit for bit
(tests/test_toy_training.py holds a fingerprint of both).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.progress import progress_bar
from vislens.toy.checks import final_checks
from vislens.toy.curves import plot_training
from vislens.toy.data import SceneStream, make_pool
from vislens.toy.stages import (
    OracleHead,
    Parts,
    Readout,
    load_stage_state,
    probe,
    save_stage_state,
    stage_optimizer,
)
from vislens.toy.training_state import RunState, atomic_lines, run_identity

EVAL_SEED = 100_000  # held-out scenes use world seed EVAL_SEED + seed: never trained on


@dataclass
class Stage:
    """One stage as data: the driver treats every stage alike."""

    name: str
    steps: int
    lr: float
    params: list[torch.nn.Parameter]  # what the optimizer trains (and the gradient clip sees)
    images: int  # scenes per step
    vision: bool  # image tokens come from the vision tower (else the oracle), scenes are fresh


@dataclass
class Built:
    """A family's untrained model and the pieces its batches and losses need."""

    model: torch.nn.Module
    processor: Any
    parts: Parts
    encoder: Any  # packs questions into the family's token layout
    image_id: int
    grid: int  # oracle patches per side of a scene


@dataclass
class Run:
    """Everything a family's stage and loss functions read, for one run."""

    recipe: Any
    model: torch.nn.Module
    parts: Parts
    oracle: OracleHead
    image_id: int
    readout: Readout
    guides: list  # attention guides: hooks that must be removed when the run ends


@dataclass(frozen=True)
class Family:
    """What differs between the toys; everything else is the driver's.

    The functions are small on purpose: each one is a choice that changes what
    is trained, so they are where a reader looks to compare the two toys.
    """

    name: str  # part of a run's identity: a state of one family never resumes the other
    work_suffix: str  # `<out><suffix>` holds the resumable state, stage files, probes
    title: str  # of the loss plot
    build: Callable[[Any, int], Built]  # (recipe, seed) -> untrained model and pieces
    guides: Callable[[Any, Parts, int], list]  # (recipe, parts, image_id) -> guides
    stages: Callable[[Run], list[Stage]]
    qa_batch: Callable[..., dict]  # the family's packed batch (`toy.data.qa_batch` shape)
    batch_options: Callable[[Any, str, int, int], dict]  # (recipe, stage, step, steps)
    loss: Callable[[Run, Stage, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    # (model, processor, work, out) -> where the checkpoint went: the work directory (which
    # then becomes `out` as a whole) or `out` itself (the work directory is then dropped)
    save: Callable[[torch.nn.Module, Any, Path, Path], Path]
    # The final checks generate with left padding, which stays on the tokenizer and so is
    # saved with it when the checkpoint is written after them. The shipped LLaVA toy was
    # saved before the checks (no padding in its tokenizer.json), toy-qwen after (padding
    # saved); each keeps its own order so a retrain writes the files that were shipped.
    save_before_checks: bool = False
    replaceable: Path | None = None  # an out dir a retrain may overwrite (the shipped one)


def drive(family: Family, out_dir: str | Path, seed: int, recipe: Any,
          progress: bool = True, log_path: str | Path | None = None,
          resume: str | Path | None = None) -> dict:
    """Train `family` into `out_dir`; returns the training summary (also saved).

    See the trainers' `train` for the files a run leaves and how it resumes.
    """
    out = Path(out_dir)
    if out.exists() and any(p.name != ".gitkeep" for p in out.iterdir()) and not (
            family.replaceable is not None and out.resolve() == family.replaceable.resolve()):
        raise FileExistsError(f"{out} is not empty; pass a new --out directory")
    work = out.with_name(out.name + family.work_suffix)
    state = RunState(work, run_identity(family.name, seed, recipe), resume, recipe.save_every)
    saved = state.load()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    built = family.build(recipe, seed)
    model, parts, encoder = built.model, built.parts, built.encoder
    oracle = OracleHead(parts.embed.weight.shape[1])
    vocab = built.processor.tokenizer.get_vocab()
    started = time.time()
    pool = make_pool(recipe.pool_size, seed, built.grid, vocab)
    held = make_pool(64, EVAL_SEED + seed, built.grid, vocab)
    stream = SceneStream(seed, built.grid, vocab, start=recipe.pool_size,
                         size=recipe.fresh_every * recipe.images_per_step_b,
                         every=max(1, recipe.fresh_every))
    log: dict = {"seed": seed, "recipe": asdict(recipe), "steps": [], "probes": []}
    run = Run(recipe, model, parts, oracle, built.image_id, Readout.from_vocab(vocab),
              family.guides(recipe, parts, built.image_id))
    stages = family.stages(run)

    def draw(stage: Stage, step: int) -> dict:
        source = stream.at(step) if stage.vision and recipe.fresh_every else pool
        idx = rng.integers(len(source.samples), size=stage.images)
        return family.qa_batch(source, idx, encoder, rng, targets=recipe.targets_per_image,
                               **family.batch_options(recipe, stage.name, step, stage.steps))

    state.bind(model, oracle, rng, stream, log)
    if saved is not None:  # after every random draw of the set-up, so the generators match
        done = state.restore(saved)
    else:
        done = load_stage_state(resume, model, oracle) if resume is not None else set()
    work.mkdir(parents=True, exist_ok=True)
    # the probe log holds what the saved state has done, nothing from after it
    probes_file = work / "probes.jsonl"
    atomic_lines(probes_file, log["probes"])
    lines = _open_lines(log_path, saved)
    if saved is None:  # from now on a rerun resumes, and other options are refused
        state.save(done, **_lines_mark(lines))

    def checkpoint(stage: Stage, step: int, optimizer, scheduler) -> None:
        if state.due(step, stage.steps):
            state.save(done, stage.name, step, optimizer, scheduler, **_lines_mark(lines))

    bar = progress_bar(info=True) if progress else None
    if bar:
        bar.start()
    try:
        model.train()
        for stage in stages:
            if stage.steps <= 0 or stage.name in done:
                continue
            within = saved if saved is not None and saved["stage"] == stage.name else None
            _train_stage(family, run, stage, draw, held, encoder, log, bar, probes_file,
                         lines, within, checkpoint)
            done.add(stage.name)
            save_stage_state(work / f"stage_{stage.name}.pt", model, oracle, done)
            state.save(done, **_lines_mark(lines))
    finally:
        for guide in run.guides:
            guide.remove()
        if bar:
            bar.stop()
        if lines:
            lines.close()
    log["train_seconds"] = round(state.seconds(), 1)
    model.eval()
    dest = family.save(model, built.processor, work, out) if family.save_before_checks else None
    scenes = shapesworld.generate(recipe.eval_scenes, seed=EVAL_SEED + seed)
    log.update(final_checks(model, built.processor, scenes))
    log["parameters"] = sum(p.numel() for p in model.parameters())
    log["total_seconds"] = round(state.seconds_before + time.time() - started, 1)
    dest = dest or family.save(model, built.processor, work, out)
    (dest / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    plot_training(log, dest / "loss.png", family.title)
    if dest.resolve() == work.resolve():
        _publish_work(work, state, out)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return log


def _publish_work(work: Path, state: RunState, out: Path) -> None:
    """The work directory, less what only a resume needs, becomes `out` in one rename
    when it can, so `out` is never seen half-written."""
    for leftover in work.glob("stage_*.pt"):
        leftover.unlink()
    state.discard()
    if not out.exists():
        os.replace(work, out)
        return
    for item in work.iterdir():
        os.replace(item, out / item.name)
    work.rmdir()


def _train_stage(family: Family, run: Run, stage: Stage, draw, held, encoder, log: dict,
                 bar, probes_file: Path, lines, saved: dict | None, checkpoint) -> None:
    """Run one stage; `saved` (a state saved inside this stage) continues it from its step,
    and `checkpoint(stage, steps_done, optimizer, scheduler)` follows every step."""
    recipe, parts, params = run.recipe, run.parts, stage.params
    # what the stage does not train gets no gradient: less work, and B cannot move the LM
    chosen = {id(p) for p in params}
    for p in [*parts.vision_params, *parts.lm.parameters(), *parts.head.parameters()]:
        p.requires_grad_(id(p) in chosen)
    optimizer, sched, start = stage_optimizer(params, stage.lr, recipe.warmup, stage.steps,
                                              saved)
    task = (bar.add_task(f"stage {stage.name}", total=stage.steps, completed=start, info="")
            if bar else None)
    for step in range(start, stage.steps):
        tick = time.time()
        batch = draw(stage, step)
        loss, terms = family.loss(run, stage, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        row = {"stage": stage.name, "step": step, "loss": round(loss.item(), 5),
               **{k: round(v.item(), 5) for k, v in terms.items()},
               "seconds": round(time.time() - tick, 3)}
        log["steps"].append(row)
        info = " ".join(f"{k} {v.item():.3f}" for k, v in {"loss": loss, **terms}.items())
        if (step + 1) % recipe.probe_every == 0 or step + 1 == stage.steps:
            acc = probe(parts, run.oracle, held, encoder, run.image_id, stage.vision,
                        make_batch=family.qa_batch)
            log["probes"].append({"stage": stage.name, "step": step + 1, **acc})
            with open(probes_file, "a") as f:
                f.write(json.dumps(log["probes"][-1]) + "\n")
            row = {**row, "probe": acc}
            info += " | " + " ".join(f"{k[:4]} {v:.2f}" for k, v in acc.items())
        if lines:
            lines.write(json.dumps(row) + "\n")
            lines.flush()
        if bar:
            bar.update(task, advance=1, info=info)
        checkpoint(stage, step + 1, optimizer, sched)
    for p in params:
        p.requires_grad_(True)


def _open_lines(log_path: str | Path | None, saved: dict | None):
    """The per-step log, cut back to the saved state's step when a run resumes.

    Why: the interrupted run may have written lines past its last saved state;
    those steps run again, and their lines must not appear twice.
    """
    if not log_path:
        return None
    mark = (saved or {}).get("lines")
    path = Path(log_path)
    if mark and mark["path"] == str(path.resolve()) and path.is_file() \
            and path.stat().st_size >= mark["size"]:
        with open(path, "r+b") as f:
            f.truncate(mark["size"])
    return open(path, "a")  # noqa: SIM115


def _lines_mark(lines) -> dict:
    """Where the per-step log stood when a state is saved (what `_open_lines` cuts back to)."""
    if lines is None:
        return {}
    lines.flush()
    return {"lines": {"path": str(Path(lines.name).resolve()), "size": lines.tell()}}
