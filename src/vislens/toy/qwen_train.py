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
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vislens.data import shapesworld
from vislens.progress import progress_bar
from vislens.toy import qwen
from vislens.toy.checks import final_checks
from vislens.toy.curves import plot_training
from vislens.toy.data import SceneStream, make_pool
from vislens.toy.qwen_attention import packed_vision_attention
from vislens.toy.qwen_data import QwenEncoder, grid_thw, head_positions, patchify, qa_batch
from vislens.toy.resume import RunState, run_identity
from vislens.toy.stages import (
    OracleHead,
    Parts,
    Readout,
    answer_logits,
    attention_rows,
    load_stage_state,
    probe,
    save_stage_state,
    stage_optimizer,
    vision_loss,
)

EVAL_SEED = 100_000
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


def train(out_dir: str | Path = qwen.TOY_QWEN_DIR, seed: int = 0,
          recipe: QwenRecipe | None = None, progress: bool = True,
          log_path: str | Path | None = None, resume: str | Path | None = None) -> dict:
    """Train toy-qwen into `out_dir`; returns the training summary (also saved).

    `out_dir` gets the Hugging Face checkpoint plus `training_log.json` and
    `loss.png`. `log_path` (optional) receives one JSON line per step as it
    goes, for watching long runs. The work directory `<out_dir>.stages/` keeps a
    resumable state (`vislens.toy.resume`): calling again with the same seed and
    recipe continues an interrupted run from its last saved step (and cuts
    `log_path` back to that step). Each stage also leaves `stage_<X>.pt` there;
    `resume=<such a file>` starts from it and runs only the stages after X.
    """
    recipe = recipe or QwenRecipe()
    out = Path(out_dir)
    if out.exists() and any(p.name != ".gitkeep" for p in out.iterdir()) \
            and out.resolve() != qwen.TOY_QWEN_DIR.resolve():
        raise FileExistsError(f"{out} is not empty; pass a new --out directory")
    work = out.with_name(out.name + ".stages")
    state = RunState(work, run_identity("qwen", seed, recipe), resume, recipe.save_every)
    saved = state.load()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = recipe.spec
    processor = qwen.build_processor(spec)
    model = qwen.build_model(spec, seed=seed)
    if recipe.init_lm:
        from vislens.toy.build import TOY_DIR
        from vislens.toy.transplant import transplant_lm

        transplant_lm(model, processor.tokenizer,
                      TOY_DIR if recipe.init_lm == "toy" else recipe.init_lm)
    parts = qwen_parts(model, processor)
    encoder = build_encoder(model, processor, spec)
    image_id = model.config.image_token_id
    oracle = OracleHead(spec.lm_hidden)
    if saved is None:  # (a saved state has the stages done; it is restored below)
        done = load_stage_state(resume, model, oracle) if resume is not None else set()
    work.mkdir(parents=True, exist_ok=True)
    guides = []
    for layer, target in ((recipe.keyword_layer, "keyword"), (recipe.guide_layer, "object")):
        if layer is not None and recipe.guide_weight > 0:
            guides.append(AttentionGuide(parts.lm.layers[layer].self_attn, image_id,
                                         recipe.guide_heads, target))
    vocab = processor.tokenizer.get_vocab()
    cells = IMAGE_SIZE // (spec.patch_size * spec.merge_size)
    started = time.time()
    pool = make_pool(recipe.pool_size, seed, cells, vocab)
    held = make_pool(64, EVAL_SEED + seed, cells, vocab)
    log: dict = {"seed": seed, "recipe": asdict(recipe), "steps": [], "probes": []}

    stream = SceneStream(seed, cells, vocab, start=recipe.pool_size,
                         size=recipe.fresh_every * recipe.images_per_step_b,
                         every=max(1, recipe.fresh_every))
    state.bind(model, oracle, rng, stream, log)
    if saved is not None:
        done = state.restore(saved)
    lines = _open_lines(log_path, saved)
    if saved is None:  # from now on a rerun resumes, and other options are refused
        state.save(done, **_lines_mark(lines))

    def checkpoint(stage: str, step: int, steps: int, optimizer, scheduler) -> None:
        if state.due(step, steps):
            state.save(done, stage, step, optimizer, scheduler, **_lines_mark(lines))

    def draw(stage: str, step: int) -> dict:
        fresh = stage in ("B", "C") and recipe.fresh_every
        source = stream.at(step) if fresh else pool
        size = recipe.images_per_step_b if stage == "B" else recipe.images_per_step
        idx = rng.integers(len(source.samples), size=size)
        return qa_batch(source, idx, encoder, rng, targets=recipe.targets_per_image,
                        background=recipe.background_a if stage == "A" else None)

    lm_params = list(dict.fromkeys([*parts.lm.parameters(), *parts.head.parameters()]))
    stages = [
        ("A", recipe.steps_a, lm_params + list(oracle.parameters()), recipe.lr_a),
        ("B", recipe.steps_b, parts.vision_params, recipe.lr_b),
        ("C", recipe.steps_c, lm_params + parts.vision_params, recipe.lr_c),
    ]
    bar = progress_bar(info=True) if progress else None
    if bar:
        bar.start()
    try:
        model.train()
        for name, steps, params, lr in stages:
            if steps > 0 and name not in done:
                within = saved if saved is not None and saved["stage"] == name else None
                _train_stage(name, steps, params, lr, recipe, parts, oracle, draw, image_id,
                             held, encoder, log, bar, lines, guides, Readout.from_vocab(vocab),
                             within, checkpoint)
                done.add(name)
                save_stage_state(work / f"stage_{name}.pt", model, oracle, done)
                state.save(done, **_lines_mark(lines))
    finally:
        for guide in guides:
            guide.remove()
        if bar:
            bar.stop()
        if lines:
            lines.close()
    log["train_seconds"] = round(state.seconds(), 1)
    model.eval()
    scenes = shapesworld.generate(recipe.eval_scenes, seed=EVAL_SEED + seed)
    log.update(final_checks(model, processor, scenes))
    log["parameters"] = sum(p.numel() for p in model.parameters())
    log["total_seconds"] = round(state.seconds_before + time.time() - started, 1)
    saved = qwen.save(model, processor, out)
    shutil.rmtree(work, ignore_errors=True)
    (saved / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    plot_training(log, saved / "loss.png",
                  "toy-qwen (A: LM on oracle tokens, B: vision, C: joint)")
    return log


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


def _train_stage(name, steps, params, lr, recipe, parts, oracle, draw, image_id, held,
                 encoder, log, bar, lines, guides, readout: Readout,
                 saved: dict | None = None, checkpoint=None) -> None:
    """Run one stage; `saved` (a state saved inside this stage) continues it from its step,
    and `checkpoint(stage, steps_done, steps, optimizer, scheduler)` follows every step."""
    for p in parts.vision_params:  # A never touches the vision side
        p.requires_grad_(name != "A")
    for p in list(parts.lm.parameters()) + list(parts.head.parameters()):
        p.requires_grad_(name != "B")  # B trains the vision side only
    optimizer, sched, start = stage_optimizer(params, lr, recipe.warmup, steps, saved)
    task = (bar.add_task(f"stage {name}", total=steps, completed=start, info="")
            if bar else None)
    for step in range(start, steps):
        tick = time.time()
        batch = draw(name, step)
        terms: dict[str, torch.Tensor] = {}
        if name == "B":
            terms["vision"] = vision_loss(parts, oracle, batch,
                                          parts.image_features(batch["pixels"]), readout,
                                          recipe.readout_weight)
        else:
            if name == "A":
                tokens = oracle(batch, parts.embed.weight)
            else:
                tokens = parts.image_features(batch["pixels"])
                terms["vision"] = recipe.aux_weight * vision_loss(
                    parts, oracle, batch, tokens, readout, recipe.readout_weight)
            logits, labels, _ = answer_logits(parts, batch, tokens, image_id)
            terms["qa"] = F.cross_entropy(logits, labels)
            for guide in guides:
                terms[f"guide_{guide.target}"] = recipe.guide_weight * guide.loss(batch)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        row = {"stage": name, "step": step, "loss": round(loss.item(), 5),
               **{k: round(v.item(), 5) for k, v in terms.items()},
               "seconds": round(time.time() - tick, 3)}
        log["steps"].append(row)
        info = " ".join(f"{k} {v.item():.3f}" for k, v in terms.items())
        if (step + 1) % recipe.probe_every == 0 or step + 1 == steps:
            acc = probe(parts, oracle, held, encoder, image_id, use_vision=name != "A",
                        make_batch=qa_batch)
            log["probes"].append({"stage": name, "step": step + 1, **acc})
            row = {**row, "probe": acc}
            info += " | " + " ".join(f"{k[:4]} {v:.2f}" for k, v in acc.items())
        if lines:
            lines.write(json.dumps(row) + "\n")
            lines.flush()
        if bar:
            bar.update(task, advance=1, info=info)
        if checkpoint is not None:
            checkpoint(name, step + 1, steps, optimizer, sched)
    for p in params:
        p.requires_grad_(True)
