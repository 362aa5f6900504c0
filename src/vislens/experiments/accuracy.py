"""How often a VLM answers ShapesWorld questions right, in the three settings of Neo et al.

Prompts are built only through the processor's own chat template, so the same
code scores the toy and any Hugging Face VLM; answers are judged by each
`Question`'s own rule (generative: the target's name appears; polling / VQA:
the continuation starts with the expected words).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vislens.data import shapesworld
from vislens.data.samples import SETTINGS, Question, Sample

SHORT_ANSWER_TOKENS = 4  # polling / VQA answers are one or two words


def chat_prompt(processor, question: Question) -> str:
    """The text a model sees: chat template with the image before the question, then the
    assistant turn opened and the question's answer prefix (e.g. "it is a") appended."""
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": question.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if question.answer_prefix:
        text += ("" if text.endswith((" ", "\n")) else " ") + question.answer_prefix
    return text


@torch.no_grad()
def generate_answers(model, processor, images: Sequence, questions: Sequence[Question],
                     max_new_tokens: int) -> list[str]:
    """Greedy continuations of one (image, question) pair each, left padded as one batch."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions; "
                         "pass one image per question")
    tokenizer = getattr(processor, "tokenizer", processor)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = [chat_prompt(processor, q) for q in questions]
        batch = processor(text=texts, images=list(images), return_tensors="pt", padding=True,
                          add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def evaluate(model, processor, samples: Sequence[Sample],
             settings: Sequence[str] = SETTINGS, batch_size: int = 16,
             max_new_tokens: int = 24, seed: int = 0, rows: bool = False) -> dict:
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
    result: dict = {"accuracy": {}, "n": len(samples), "questions": {}}
    listed: list[dict] = []
    try:
        for setting in settings:
            items = [(s, q) for s in samples for q in shapesworld.questions(s, setting, rng=rng)]
            budget = max_new_tokens if setting == "generative" else min(max_new_tokens,
                                                                         SHORT_ANSWER_TOKENS)
            correct = 0
            for i in range(0, len(items), batch_size):
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
            result["questions"][setting] = len(items)
    finally:
        model.train(was_training)
    if rows:
        result["rows"] = listed
    return result
