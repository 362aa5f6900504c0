"""The one way every command turns (images, question) into model input.

Real chat templates differ in ways the toys hide: the three llava-hf templates
write every image before every text whatever the content order, Qwen's keeps the
order and adds a default system prompt, LLaVA-1.5 / Llama-3 tokenizers add BOS
themselves while the toys' templates write it. One builder keeps `eval`, the
experiments and the perception features on the same text and the same ids:

- the chat template renders the user turn (images, then the question);
- a text PREFIX must precede the image tokens (Liu et al.'s text-prefix
  experiment): where the template moves images first, the prefix is spliced in
  front of the first image placeholder of the rendered text instead;
- an ANSWER PREFIX ("It is a") continues the assistant turn, with a space only
  when the generation prompt does not already end in whitespace;
- special tokens are added by the tokenizer unless the text already starts with
  its BOS (what `apply_chat_template(tokenize=True)` does in transformers 5).

PaliGemma has no chat template and no turns: its prompt is the image tokens, BOS,
the question and a newline, all of it a bidirectional prefix; what follows the
newline is the causal suffix the model writes. vislens renders that text whole
(an answer prefix goes after the newline, in the suffix, as if the model had
written it) and encodes it as the processor does a prompt and suffix pair, with
`token_type_ids` saying which part each token is in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PREFIX_SEPARATOR = "\n"


def prefix_lm(processor) -> bool:
    """Whether the processor builds a PaliGemma-style prompt (prefix + suffix, no template)."""
    from transformers import PaliGemmaProcessor

    return isinstance(processor, PaliGemmaProcessor)


def image_placeholder(processor) -> str:
    """The image placeholder as a template writes it (Qwen wraps it in vision markers)."""
    token = getattr(processor, "image_token", None) or "<image>"
    tok = processor.tokenizer
    start = getattr(tok, "vision_start_token", None) or (
        "<|vision_start|>" if "<|vision_start|>" in tok.get_vocab() else None)
    return f"{start}{token}" if start and token == "<|image_pad|>" else token


def _apply_template(processor, content: list[dict]) -> str:
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render(processor, prompt: str, n_images: int = 1, prefix: str | None = None,
           answer_prefix: str | None = None) -> str:
    """Chat text for one sample: [prefix] images question, then the answer prefix."""
    if prefix_lm(processor):
        return _render_prefix_lm(processor, prompt, n_images, prefix, answer_prefix)
    images = [{"type": "image"}] * n_images
    question = [{"type": "text", "text": prompt}]
    if prefix:
        text = _apply_template(processor, [{"type": "text", "text": prefix}, *images, *question])
        placeholder = image_placeholder(processor)
        first = text.find(placeholder) if n_images else len(text)
        at = text.find(prefix)
        if n_images and (at < 0 or at + len(prefix) > first):
            # the template writes images first: put the prefix before the first image
            text = _apply_template(processor, [*images, *question])
            first = text.find(placeholder)
            if first < 0:
                raise ValueError(f"the chat template wrote no {placeholder!r}; cannot place the "
                                 "text prefix before the image")
            text = text[:first] + prefix + PREFIX_SEPARATOR + text[first:]
    else:
        text = _apply_template(processor, [*images, *question])
    if answer_prefix:
        text += ("" if text.endswith((" ", "\n")) else " ") + answer_prefix
    return text


def _render_prefix_lm(processor, prompt: str, n_images: int, prefix: str | None,
                      answer_prefix: str | None) -> str:
    """[prefix + newline] images BOS question newline [answer prefix]: the processor puts BOS
    after the last image token and a newline after the text, a text prefix stays first."""
    text = (prefix + PREFIX_SEPARATOR if prefix else "") + processor.image_token * n_images
    text += processor.tokenizer.bos_token + prompt + "\n"
    return text + (answer_prefix or "")


def _encode_prefix_lm(processor, images: list[list], texts: Sequence[str]
                      ) -> dict[str, torch.Tensor]:
    """Ids, mask and token types of rendered PaliGemma texts, left padded.

    As the processor encodes a prompt and a suffix: each image token expanded to
    `image_seq_length`, the prefix (up to its closing newline) and the suffix
    tokenised apart with no special tokens added (BOS is in the text), type 0 for
    the prefix and 1 for the suffix.
    """
    tokenizer = processor.tokenizer
    token = processor.image_token
    rows = []
    for text in texts:
        cut = text.rfind("\n") + 1
        parts = [text[:cut].replace(token, token * processor.image_seq_length), text[cut:]]
        ids = [tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
               for part in parts]
        rows.append((ids[0] + ids[1], [0] * len(ids[0]) + [1] * len(ids[1])))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    out = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
    for ids, types in rows:
        gap = width - len(ids)
        out["input_ids"].append([pad] * gap + ids)
        out["attention_mask"].append([0] * gap + [1] * len(ids))
        out["token_type_ids"].append([0] * gap + types)
    enc = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    flat = [image for entry in images for image in entry]
    enc["pixel_values"] = processor.image_processor(flat, return_tensors="pt")["pixel_values"]
    return enc


def adds_special_tokens(tokenizer, text: str) -> bool:
    """Let the tokenizer add BOS unless the rendered text already begins with it."""
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def encode(processor, images: Sequence, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenise rendered texts with their images, left padded, one rule for BOS.

    images: one entry per text, an image or a list of images (several per sample).
    """
    tokenizer = processor.tokenizer
    specials = {adds_special_tokens(tokenizer, t) for t in texts}
    if len(specials) != 1:
        raise ValueError("texts of one batch disagree on whether they start with BOS")
    # nested lists tell every processor which images belong to which prompt (Gemma 3 and
    # the multi-image families read a flat list as one prompt's images)
    batch_images = [list(entry) if isinstance(entry, list | tuple) else [entry]
                    for entry in images]
    if prefix_lm(processor):
        return _encode_prefix_lm(processor, batch_images, texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = processor(images=batch_images or None, text=list(texts), return_tensors="pt",
                        padding=True, add_special_tokens=specials.pop())
    finally:
        tokenizer.padding_side = side
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
