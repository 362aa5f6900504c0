"""Start toy-qwen's language model from the LLaVA toy's: same words, same lookup circuit.

Why: the slow part of training a small VLM from scratch is the LM's route from the
question's words to the matching image tokens (`stages.py`). The LLaVA toy's LM
already has it, and a Qwen2 decoder layer is a Llama one plus q/k/v biases (left
at zero here) and mRoPE, which on text positions is Llama's RoPE. Measured: after
the copy, 100 steps of stage A in Qwen's own token layout answered teacher-forced
0.85 / 1.00 / 0.99 (generative / polling / VQA) from oracle tokens, where training
toy-qwen's LM from scratch for 600 steps left polling at chance. Real VLMs do the
same: they start from a pretrained language model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vislens.toy.qwen import IM_END, IM_START, IMAGE_PAD, PAD

# Qwen-layout token -> the LLaVA toy token playing the same role in its template
TWINS = {IMAGE_PAD: "<image>", IM_START: "<s>", "assistant": "<sep>", IM_END: "</s>",
         PAD: "<pad>"}


def transplant_lm(model, tokenizer, source: str | Path) -> list[str]:
    """Copy the language model of the LLaVA toy at `source` into a toy-qwen `model`.

    Embedding rows are matched by word (specials by role, `TWINS`); returns the
    tokens that had no counterpart and keep their fresh initialisation.
    """
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model directory; pass the LLaVA toy's "
                                "directory (e.g. the shipped `toy`) to start toy-qwen from")
    donor = AutoModelForImageTextToText.from_pretrained(source)
    donor_vocab = AutoTokenizer.from_pretrained(source).get_vocab()
    weights = donor.model.language_model.state_dict()
    target = model.model.language_model
    own = target.state_dict()
    for name, value in weights.items():
        if name != "embed_tokens.weight" and own[name].shape != value.shape:
            raise ValueError(f"{name}: toy-qwen has {tuple(own[name].shape)}, the donor "
                             f"{tuple(value.shape)}; build toy-qwen with the donor's LM sizes")
    result = target.load_state_dict(
        {k: v for k, v in weights.items() if k != "embed_tokens.weight"}, strict=False)
    left = [k for k in result.missing_keys
            if not k.endswith(".bias") and k != "embed_tokens.weight"]
    if left or result.unexpected_keys:
        raise ValueError(f"donor and toy-qwen LMs differ: {left + result.unexpected_keys}")
    with torch.no_grad():
        for key in result.missing_keys:
            if key.endswith(".bias"):
                target.get_parameter(key).zero_()
        unmatched = []
        rows = target.embed_tokens.weight
        for word, i in tokenizer.get_vocab().items():
            twin = TWINS.get(word, word)
            if twin in donor_vocab:
                rows[i] = weights["embed_tokens.weight"][donor_vocab[twin]]
            else:
                unmatched.append(word)
    return unmatched
