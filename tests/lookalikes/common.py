"""What every look-alike shares: the shrunk language-model sizes, the tokenizer trainers
and their corpus, the Qwen2 pre-tokenizer and specials several families reuse, and the writer
every builder goes through (write_look_alike).

A change here changes the fingerprint of every family (lookalikes/__init__.py), so every
look-alike is rebuilt; a family's own values belong in its own module.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 0

# ---- shrunk sizes (depth and width only; everything else is the real value) --------------------
LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# CLIP ViT-L/14-336 (LLaVA-1.5 and LLaVA-NeXT), shrunk
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            projection_dim=32, image_size=336, patch_size=14, model_type="clip_vision_model")

# ---- processing geometry ------------------------------------------------------------------------
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RESCALE = 0.00392156862745098

# ---- tokenizers ---------------------------------------------------------------------------------
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Merges learned on the corpus below: enough for the prompt words to be whole, too few for the
# rarer class names, which (as in real vocabularies for many COCO names) come out in pieces.
MERGES = 350
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN25VL_SPECIALS = QWEN_SPECIALS + [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
HUGE = 1000000000000000019884624838656  # transformers' "no limit" model_max_length

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")


def corpus() -> list[str]:
    """The training text: prompts many times over, each class name only a few times."""
    prompts = [
        "Describe this image.", "describe this image .", "What is this?",
        "What is the main object in this image?", "What is shown in this image?",
        "You are a helpful assistant.", "You are a helpful language and vision assistant.",
        "USER: What is this? ASSISTANT: Yes", "user assistant system", "Yes No yes no",
        "There is a small object on the left and a large one on the right.",
        "The picture shows a scene with several objects above and below the table.",
    ]
    lines = prompts * 12
    for name in COCO_CLASSES:
        lines += [f"Is there a {name} in this image?", f"is there a {name} in this image ?"]
    for name in (f"{c} {s}" for c in COLORS for s in SHAPES):
        lines += [f"is there a {name} in this image ?", f"It is a {name}."]
    lines += ["Yes", "No", "yes", "no", "Yes.", "No."] * 20
    lines += [f"ASSISTANT: {a}" for a in ("Yes", "No", "yes", "no")] * 20
    for color in COLORS:
        lines += [f"what shape is the {color} object ?", f"it is {color} ."] * 4
    for shape in SHAPES:
        lines += [f"what color is the {shape} ?", f"it is a small {shape} ."] * 4
    lines += [" ".join(str(n) for n in range(k, k + 10)) for k in range(0, 200, 10)]
    lines += ["1, 2, 3 and 10 or 25 and 100 of 2024."] * 4
    return lines


def fillers(start: int, stop: int) -> list[str]:
    """Entries that pad a vocabulary to its real size; no merge and no pre-token produces them."""
    return [f"<fill_{i:06d}>" for i in range(start, stop)]


def train_bpe(tokenizer, alphabet: list[str]):
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + MERGES, initial_alphabet=alphabet,
                                  show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    return [tok for tok, _ in vocab], [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                       for m in state["merges"]]


def bytelevel_tokenizer(split: str, n_regular: int, specials: list[str], llama3: bool):
    """GPT-style byte-level BPE padded to `n_regular` regular tokens, then `specials`.

    The two kinds differ as their tokenizer.json files do: Llama-3 prepends
    <|begin_of_text|> in its post-processor and sets ignore_merges and
    trim_offsets; Qwen2 adds nothing and normalises to NFC first.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=llama3, use_regex=False),
    ])
    norm = None if llama3 else normalizers.NFC()
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre
    trainer_tok.normalizer = norm
    tokens, merges = train_bpe(trainer_tok, pre_tokenizers.ByteLevel.alphabet())
    regular = tokens + fillers(len(tokens), n_regular)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(regular)}, merges=merges,
                               ignore_merges=llama3))
    tok.pre_tokenizer = pre
    tok.normalizer = norm
    tok.decoder = decoders.ByteLevel()
    level = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(specials)
    if not llama3:
        tok.post_processor = level
    else:
        bos = specials[0]
        tok.post_processor = processors.Sequence([level, processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok


def bytelevel_bpe(pre, normalizer, head: list[str], n_total: int, tail: list[str], post):
    """Byte-level BPE: `head` specials first, merges learned on the shared corpus, fillers to
    `n_total` ids, then `tail` added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre
    trainer_tok.normalizer = normalizer
    tokens, merges = train_bpe(trainer_tok, pre_tokenizers.ByteLevel.alphabet())
    regular = head + tokens
    regular += fillers(len(regular), n_total)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(regular)}, merges=merges))
    tok.pre_tokenizer = pre
    tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(head + tail)
    if post is not None:
        tok.post_processor = post(tok)
    return tok


def added_tokens_decoder(tok) -> dict:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


# ---- building -----------------------------------------------------------------------------------
def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_look_alike(out: Path, config: dict, files: dict[str, dict | None], tokenizer,
                     prepare=None) -> Path:
    """One look-alike directory: config.json, random weights (seeded; `prepare(model)` may
    change them before saving), the other JSON files (None = the release has none) and the
    tokenizer (tokenizer_files' triple). Every fixture builder writes through this."""
    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _dump(out / "config.json", config)
    hf_config = transformers.AutoConfig.from_pretrained(out)
    torch.manual_seed(SEED)
    model = getattr(transformers, config["architectures"][0])(hf_config).to(torch.float32)
    if prepare is not None:
        prepare(model)
    model.save_pretrained(out)
    _dump(out / "config.json", config)  # save_pretrained rewrote it in the nested 5.x layout
    for file, content in files.items():
        if content is not None:
            _dump(out / file, content)
    tok, tok_config, special = tokenizer
    tok.save(str(out / "tokenizer.json"))
    _dump(out / "tokenizer_config.json", tok_config)
    _dump(out / "special_tokens_map.json", special)
    return out

