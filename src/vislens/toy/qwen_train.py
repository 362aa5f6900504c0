"""Reproduce toy-qwen from scratch on a CPU: `train(out_dir, seed)`.

The LLaVA toy's recipe and stage code (`vislens.toy.stages`), unchanged:
A) the LM learns to answer from oracle image tokens, B) the vision tower +
merger regress those tokens from pixels, C) everything is fine-tuned on the
questions with the regression kept as an auxiliary loss. This module only
supplies the Qwen pieces: the `Parts` of a Qwen2.5-VL model, the packed
encoder with mRoPE positions, and the batched window attention that makes the
vision tower trainable on a CPU. Held-out scenes use world seed
`EVAL_SEED + seed` (the LLaVA toy's), never trained on.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.toy import qwen
from vislens.toy.data import make_pool, qa_batch
from vislens.toy.qwen_attention import packed_vision_attention
from vislens.toy.qwen_data import QwenEncoder, grid_thw, head_positions, patchify
from vislens.toy.stages import (
    OracleHead,
    Parts,
    dense_loss,
    probe,
    schedule,
    stage_a_step,
    stage_c_step,
)

EVAL_SEED = 100_000
IMAGE_SIZE = 96


@dataclass
class QwenRecipe:
    """Every knob of a run; saved in the log so a run can be repeated."""

    spec: qwen.QwenToySpec = field(default_factory=qwen.QwenToySpec)
    pool_size: int = 3000
    images_per_step: int = 16
    targets_per_image: int = 2
    background_a: int | None = 8  # stage A keeps object tokens + this many background ones
    steps_a: int = 600
    lr_a: float = 3e-3
    steps_b: int = 300
    lr_b: float = 2e-3
    steps_c: int = 200
    lr_c: float = 5e-4
    aux_weight: float = 1.0
    warmup: int = 50
    probe_every: int = 100
    eval_scenes: int = 100
    threads: int = 1  # on the shared 2-core CPU one thread is faster than two


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


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())


def train(out_dir: str | Path = qwen.TOY_QWEN_DIR, seed: int = 0,
          recipe: QwenRecipe | None = None, progress: bool = True,
          log_path: str | Path | None = None) -> dict:
    """Train toy-qwen from scratch into `out_dir`; returns the training summary (also saved).

    `out_dir` gets the Hugging Face checkpoint plus `training_log.json` and
    `loss.png`. `log_path` (optional) receives one JSON line per step as it
    goes, for watching long runs.
    """
    recipe = recipe or QwenRecipe()
    out = Path(out_dir)
    if out.exists() and any(p.name != ".gitkeep" for p in out.iterdir()) \
            and out.resolve() != qwen.TOY_QWEN_DIR.resolve():
        raise FileExistsError(f"{out} is not empty; pass a new --out directory")
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = recipe.spec
    processor = qwen.build_processor(spec)
    model = qwen.build_model(spec, seed=seed)
    parts = qwen_parts(model, processor)
    encoder = build_encoder(model, processor, spec)
    image_id = model.config.image_token_id
    oracle = OracleHead(spec.lm_hidden)
    vocab = processor.tokenizer.get_vocab()
    cells = IMAGE_SIZE // (spec.patch_size * spec.merge_size)
    started = time.time()
    pool = make_pool(recipe.pool_size, seed, cells, vocab)
    held = make_pool(64, EVAL_SEED + seed, cells, vocab)
    log: dict = {"seed": seed, "recipe": asdict(recipe), "steps": [], "probes": []}
    stream = open(log_path, "a") if log_path else None  # noqa: SIM115

    def draw(background: int | None = None) -> dict:
        idx = rng.integers(len(pool.samples), size=recipe.images_per_step)
        return qa_batch(pool, idx, encoder, rng, targets=recipe.targets_per_image,
                        background=background)

    lm_params = list(parts.lm.parameters()) + list(parts.head.parameters())
    stages = [
        ("A", recipe.steps_a, lm_params + list(oracle.parameters()), recipe.lr_a),
        ("B", recipe.steps_b, parts.vision_params, recipe.lr_b),
        ("C", recipe.steps_c, lm_params + parts.vision_params, recipe.lr_c),
    ]
    bar = _progress() if progress else None
    if bar:
        bar.start()
    try:
        model.train()
        for name, steps, params, lr in stages:
            if steps > 0:
                _train_stage(name, steps, params, lr, recipe, parts, oracle, draw, image_id,
                             held, encoder, log, bar, stream)
    finally:
        if bar:
            bar.stop()
        if stream:
            stream.close()
    log["train_seconds"] = round(time.time() - started, 1)
    model.eval()
    scenes = shapesworld.generate(recipe.eval_scenes, seed=EVAL_SEED + seed)
    log.update(final_checks(model, processor, scenes))
    log["parameters"] = sum(p.numel() for p in model.parameters())
    log["total_seconds"] = round(time.time() - started, 1)
    saved = qwen.save(model, processor, out)
    (saved / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    _plot(log, saved / "loss.png")
    return log


def _train_stage(name, steps, params, lr, recipe, parts, oracle, draw, image_id, held,
                 encoder, log, bar, stream) -> None:
    for p in parts.vision_params:  # B trains only the vision side; A never touches it
        p.requires_grad_(name != "A")
    frozen_lm = name == "B"
    for p in list(parts.lm.parameters()) + list(parts.head.parameters()):
        p.requires_grad_(not frozen_lm)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = schedule(optimizer, min(recipe.warmup, steps // 4 + 1), steps)
    task = bar.add_task(f"stage {name}", total=steps, info="") if bar else None
    use_vision = name != "A"
    for step in range(steps):
        tick = time.time()
        batch = draw(recipe.background_a if name == "A" else None)
        aux = None
        if name == "A":
            loss = stage_a_step(parts, oracle, batch, image_id)
        elif name == "B":
            loss = dense_loss(parts, oracle, batch)
        else:
            loss, aux = stage_c_step(parts, oracle, batch, image_id, recipe.aux_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        row = {"stage": name, "step": step, "loss": round(float(loss), 5),
               "seconds": round(time.time() - tick, 3)}
        if aux is not None:
            row["dense"] = round(float(aux), 5)
        log["steps"].append(row)
        info = f"loss {float(loss):.3f}"
        if (step + 1) % recipe.probe_every == 0 or step + 1 == steps:
            with torch.no_grad():
                acc = probe(parts, oracle, held, encoder, image_id, use_vision)
            log["probes"].append({"stage": name, "step": step + 1, **acc})
            row = {**row, "probe": acc}
            info += " | " + " ".join(f"{k[:4]} {v:.2f}" for k, v in acc.items())
        if stream:
            stream.write(json.dumps(row) + "\n")
            stream.flush()
        if bar:
            bar.update(task, advance=1, info=info)
    for p in params:
        p.requires_grad_(True)


@torch.no_grad()
def mean_image_token(model, processor, images) -> torch.Tensor:
    """Mean merged image token (post-merger, what the LM receives) over reference images."""
    enc = processor.image_processor(images=list(images), return_tensors="pt")
    out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"],
                                         return_dict=True)
    return torch.cat(list(out.pooler_output)).mean(0)


def final_checks(model, processor, scenes) -> dict:
    """Held-out accuracy by generation, and the same with every image token ablated."""
    from vislens.experiments.accuracy import evaluate
    from vislens.toy.checks import replace_image_tokens

    clean = evaluate(model, processor, scenes)
    reference = shapesworld.generate(64, seed=EVAL_SEED + 7_777)
    mean = mean_image_token(model, processor, [s.image for s in reference])
    with replace_image_tokens(model, mean):
        ablated = evaluate(model, processor, scenes)
    return {"held_out": {"scenes": len(scenes), "seed": scenes[0].meta["seed"],
                         "accuracy": clean["accuracy"]},
            "ablated_all_image_tokens": {"accuracy": ablated["accuracy"]}}


def _plot(log: dict, path: Path) -> None:
    from vislens.toy.train import plot_losses

    plot_losses(log, path)
