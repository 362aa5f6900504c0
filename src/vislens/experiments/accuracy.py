"""How often a VLM answers ShapesWorld questions right, in the three settings of Neo et al.

Prompts and token ids come from vislens.models.prompting (the builder every
experiment uses), so the same code scores the toy and any Hugging Face VLM;
answers are judged by each `Question`'s own rule (vislens.data.answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.data.samples import SETTINGS, Question, Sample
from vislens.experiments.stats import wilson_ci
from vislens.models import prompting

SHORT_ANSWER_TOKENS = 4  # polling / VQA answers are one or two words


@torch.no_grad()
def generate_answers(model, processor, images: Sequence, questions: Sequence[Question],
                     max_new_tokens: int) -> list[str]:
    """Greedy continuations of one (image, question) pair each, left padded as one batch.

    Prompts and ids come from vislens.models.prompting, the builder every experiment
    uses, so `eval` scores exactly what the experiments ask.
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions; "
                         "pass one image per question")
    texts = [prompting.render(processor, q.prompt, answer_prefix=q.answer_prefix or None)
             for q in questions]
    batch = prompting.encode(processor, list(images), texts)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    new = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


class _AccuracyOptional(TypedDict, total=False):
    rows: list[dict]  # with rows=True: every question, answer and verdict
    seed: int  # the scenes' world (added by `vislens study`, experiments/study.py)


class AccuracySummary(_AccuracyOptional):
    """What `evaluate` returns (`vislens eval --json`; the study's accuracy.json "result",
    read by report/sections.py `accuracy_section`)."""

    accuracy: dict[str, float]  # setting -> share of questions answered right
    ci95: dict[str, list[float]]  # setting -> Wilson interval
    n: int  # scenes
    questions: dict[str, int]  # setting -> questions asked


def evaluate(model, processor, samples: Sequence[Sample],
             settings: Sequence[str] = SETTINGS, batch_size: int = 16,
             max_new_tokens: int = 24, seed: int = 0, rows: bool = False,
             progress=None) -> AccuracySummary:
    """Accuracy per setting over every question ShapesWorld offers for each sample.

    Polling counts its yes and its no question, VQA its shape and color question.
    Generative decodes `max_new_tokens`; the short settings decode a few tokens.
    With `rows=True` the result also lists every question, answer and verdict.
    """
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    if not samples:
        raise ValueError("no samples to evaluate; pass at least one scene")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    result: AccuracySummary = {"accuracy": {}, "ci95": {}, "n": len(samples), "questions": {}}
    listed: list[dict] = []
    try:
        for setting in settings:
            items = [(s, q) for s in samples for q in shapesworld.questions(s, setting, rng=rng)]
            budget = max_new_tokens if setting == "generative" else min(max_new_tokens,
                                                                         SHORT_ANSWER_TOKENS)
            correct = 0
            starts = range(0, len(items), batch_size)
            for i in (progress(starts, f"eval {setting}") if progress else starts):
                chunk = items[i:i + batch_size]
                answers = generate_answers(model, processor, [s.image for s, _ in chunk],
                                           [q for _, q in chunk], budget)
                for (sample, q), answer in zip(chunk, answers, strict=True):
                    ok = q.is_correct(answer)
                    correct += ok
                    if rows:
                        listed.append({"sample": sample.id, "setting": setting, "kind": q.kind,
                                       "prompt": q.prompt, "expected": q.answer,
                                       "generated": answer, "correct": ok})
            result["accuracy"][setting] = correct / len(items) if items else float("nan")
            result["ci95"][setting] = list(wilson_ci(correct, len(items)))
            result["questions"][setting] = len(items)
    finally:
        model.train(was_training)
    if rows:
        result["rows"] = listed
    return result
