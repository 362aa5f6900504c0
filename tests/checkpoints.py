"""Offline look-alikes of the four checkpoints the seed papers use.

vislens has to work on llava-1.5-7b-hf, llama3-llava-next-8b-hf,
llava-onevision-qwen2-7b-ov-hf and Qwen2.5-VL-7B-Instruct, but tests cannot
download them. Each directory written here matches its checkpoint in every
file a loader reads (hub-layout config.json, image processor, processor,
tokenizer of the same kind with the real special-token ids, chat template
with the real quirks, generation config) except the weights: the language
model and the vision tower are shrunk in depth and width and randomly
initialised (seeded). Vocabulary sizes stay real, so token ids, embedding
rows and logit widths are those of the real model. The facts come from
docs/sources/real-checkpoints.md; values that sheet marks UNVERIFIED
are noted where they are chosen.

Use `checkpoint_dir(name)` (a Path that `vislens.load(str(path))` reads) or
the session fixture `checkpoint` in conftest.py, which yields (name, path)
for each of NAMES. Building all four takes a few seconds and writes about
240 MB (the real vocabularies dominate), so `checkpoint_dir` caches each
directory under $VISLENS_FIXTURE_CACHE (default ~/.cache/vislens/fixtures)
with a key that changes whenever this file or the library versions change,
and publishes it with one atomic rename so concurrent or interrupted
sessions never see half a checkpoint. Older keys are not pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

LLAVA15 = "llava-1.5-7b-hf"
NEXT = "llama3-llava-next-8b-hf"
ONEVISION = "llava-onevision-qwen2-7b-ov-hf"
QWEN25VL = "Qwen2.5-VL-7B-Instruct"
NAMES = (LLAVA15, NEXT, ONEVISION, QWEN25VL)
SEED = 0

# ---- shrunk sizes (depth and width only; everything else is the real value) --------------------
LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# Real KV heads: 32 (no GQA), 8 of 32 (Llama-3), 4 of 28 (Qwen2 / Qwen2.5): kept grouped.
KV_HEADS = {LLAVA15: 4, NEXT: 1, ONEVISION: 2, QWEN25VL: 2}
# mrope_section must sum to head_dim / 2 = 8; the real [16, 24, 24] scaled by 1/8.
MROPE_SECTION = [2, 3, 3]
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            projection_dim=32, image_size=336, patch_size=14, model_type="clip_vision_model")
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              image_size=384, patch_size=14, vision_use_head=False,
              model_type="siglip_vision_model")
# Real: depth 32 with full attention in the last block of each group of 8 ([7, 15, 23, 31]);
# depth 4 keeps both window and full-attention blocks ([1, 3]).
QWEN_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, hidden_act="silu",
                   in_chans=3, out_hidden_size=LM["hidden_size"], patch_size=14,
                   spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2,
                   window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2)

# ---- processing geometry ------------------------------------------------------------------------
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RESCALE = 0.00392156862745098
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]

# ---- tokenizers ---------------------------------------------------------------------------------
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Merges learned on the corpus below: enough for the prompt words to be whole, too few for the
# rarer class names, which (as in real vocabularies for many COCO names) come out in pieces.
MERGES = 350
LLAMA3_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)
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


def _fillers(start: int, stop: int) -> list[str]:
    """Entries that pad a vocabulary to its real size; no merge and no pre-token produces them."""
    return [f"<fill_{i:06d}>" for i in range(start, stop)]


def _train_bpe(tokenizer, alphabet: list[str]):
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + MERGES, initial_alphabet=alphabet,
                                  show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    return [tok for tok, _ in vocab], [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                       for m in state["merges"]]


def sentencepiece_tokenizer():
    """Llama-2 kind: BPE over "▁"-joined text, byte fallback, ids 0-2 then 256 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = norm
    # Training splits at "▁" so no piece spans two words, as SentencePiece guarantees.
    # Digits stay single and punctuation stays apart, as in the Llama vocabulary.
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    alphabet = sorted({ch for line in corpus() for ch in "▁" + line.replace(" ", "▁")})
    tokens, merges = _train_bpe(trainer_tok, alphabet)
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    regular = head + [t for t in tokens if t not in head]
    regular += _fillers(len(regular), 32000)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(regular)}, merges=merges,
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<image>", "<pad>"])
    return tok


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
    tokens, merges = _train_bpe(trainer_tok, pre_tokenizers.ByteLevel.alphabet())
    regular = tokens + _fillers(len(tokens), n_regular)
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


def _added_tokens_decoder(tok) -> dict:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def tokenizer_files(name: str) -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them."""
    if name == LLAVA15:
        tok = sentencepiece_tokenizer()
        config = dict(add_bos_token=True, add_eos_token=False, bos_token="<s>",
                      clean_up_tokenization_spaces=False, eos_token="</s>", legacy=False,
                      model_max_length=HUGE, pad_token="<pad>", padding_side="left",
                      processor_class="LlavaProcessor", sp_model_kwargs={},
                      tokenizer_class="LlamaTokenizer", unk_token="<unk>",
                      use_default_system_prompt=False)
        special = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    elif name == NEXT:
        tok = bytelevel_tokenizer(LLAMA3_SPLIT, 128000, LLAMA3_SPECIALS + ["<image>", "<pad>"],
                                  llama3=True)
        # padding_side is UNVERIFIED for this checkpoint: left out, so transformers' default.
        config = dict(bos_token="<|begin_of_text|>", clean_up_tokenization_spaces=True,
                      eos_token="<|eot_id|>", model_input_names=["input_ids", "attention_mask"],
                      model_max_length=HUGE, pad_token="<pad>",
                      processor_class="LlavaNextProcessor",
                      tokenizer_class="PreTrainedTokenizerFast")
        special = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>")
    elif name in (ONEVISION, QWEN25VL):
        specials = QWEN_SPECIALS + ["<image>", "<video>"] if name == ONEVISION \
            else QWEN25VL_SPECIALS
        tok = bytelevel_tokenizer(QWEN2_SPLIT, 151643, specials, llama3=False)
        extra = specials[1:3] if name == ONEVISION else specials[1:]
        config = dict(add_prefix_space=False, additional_special_tokens=extra, bos_token=None,
                      clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
                      model_max_length=131072, pad_token="<|endoftext|>",
                      split_special_tokens=False, tokenizer_class="Qwen2Tokenizer",
                      unk_token=None)
        if name == ONEVISION:
            # padding_side "right" is the sibling 7b-si-hf's value (UNVERIFIED for ov).
            config.update(padding_side="right", processor_class="LlavaOnevisionProcessor")
        special = dict(additional_special_tokens=extra, eos_token="<|im_end|>",
                       pad_token="<|endoftext|>")
    else:
        raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")
    config = {"added_tokens_decoder": _added_tokens_decoder(tok), **config}
    return tok, config, special


# ---- chat templates (written from the documented formats) -------------------------------------
LLAVA15_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ item['text'] + ' ' }}{% endgeneration %}"
    "{%- else -%}{{ item['text'] + ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
NEXT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}"
    "{{ '\\n' + item['text'] + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)
ONEVISION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
QWEN25VL_TEMPLATE = (
    "{%- set images = namespace(n=0) -%}{%- set videos = namespace(n=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set images.n = images.n + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' + images.n|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set videos.n = videos.n + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Video ' + videos.n|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
TEMPLATES = {LLAVA15: LLAVA15_TEMPLATE, NEXT: NEXT_TEMPLATE, ONEVISION: ONEVISION_TEMPLATE,
             QWEN25VL: QWEN25VL_TEMPLATE}


# ---- configs in the hub layout ------------------------------------------------------------------
def _text(model_type: str, name: str, **real) -> dict:
    return dict(model_type=model_type, **LM, num_key_value_heads=KV_HEADS[name],
                torch_dtype="float32", **real)


def model_config(name: str) -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk."""
    if name == LLAVA15:
        return dict(
            architectures=["LlavaForConditionalGeneration"], ignore_index=-100,
            image_token_index=32000, model_type="llava", pad_token_id=32001,
            projector_hidden_act="gelu",
            text_config=_text("llama", name, architectures=["LlamaForCausalLM"],
                              max_position_embeddings=4096, rms_norm_eps=1e-5,
                              vocab_size=32064),
            tie_word_embeddings=False, torch_dtype="float32", vision_config=dict(CLIP),
            vision_feature_layer=-2, vision_feature_select_strategy="default", vocab_size=32064)
    if name == NEXT:
        return dict(
            architectures=["LlavaNextForConditionalGeneration"], ignore_index=-100,
            image_grid_pinpoints=NEXT_PINPOINTS, image_token_index=128256,
            model_type="llava_next", projector_hidden_act="gelu",
            text_config=_text("llama", name, architectures=["LlamaForCausalLM"],
                              bos_token_id=128000, eos_token_id=128009,
                              max_position_embeddings=8192, rms_norm_eps=1e-5,
                              rope_theta=500000.0, vocab_size=128320),
            tie_word_embeddings=False, torch_dtype="float32", use_image_newline_parameter=True,
            vision_config=dict(CLIP), vision_feature_layer=-2,
            vision_feature_select_strategy="default", vocab_size=128320)
    if name == ONEVISION:
        return dict(
            architectures=["LlavaOnevisionForConditionalGeneration"],
            image_grid_pinpoints=OV_PINPOINTS, image_token_index=151646,
            model_type="llava_onevision", projector_hidden_act="gelu",
            text_config=_text("qwen2", name, architectures=["Qwen2ForCausalLM"],
                              bos_token_id=151643, eos_token_id=151645,
                              max_position_embeddings=32768, max_window_layers=2,
                              rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072,
                              tie_word_embeddings=False, use_sliding_window=False,
                              vocab_size=152128),
            tie_word_embeddings=False, torch_dtype="float32", use_image_newline_parameter=True,
            video_token_index=151647, vision_aspect_ratio="anyres_max_9",
            vision_config=dict(SIGLIP), vision_feature_layer=-1,
            vision_feature_select_strategy="full")
    if name == QWEN25VL:
        # The released file is flat (text fields at the top level), not nested.
        return dict(
            architectures=["Qwen2_5_VLForConditionalGeneration"], attention_dropout=0.0,
            bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
            vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
            video_token_id=151656, hidden_act="silu", **LM, initializer_range=0.02,
            max_position_embeddings=128000, max_window_layers=2, model_type="qwen2_5_vl",
            num_key_value_heads=KV_HEADS[name], rms_norm_eps=1e-6, rope_theta=1000000.0,
            sliding_window=32768, tie_word_embeddings=False, torch_dtype="float32",
            use_cache=True, use_sliding_window=False, vision_config=dict(QWEN_VISION),
            rope_scaling={"type": "mrope", "mrope_section": MROPE_SECTION}, vocab_size=152064)
    raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")


def preprocessor_config(name: str) -> dict:
    clip = dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, rescale_factor=RESCALE)
    crop = dict(crop_size={"height": 336, "width": 336}, do_center_crop=True,
                size={"shortest_edge": 336})
    if name == LLAVA15:
        return dict(**clip, **crop, image_processor_type="CLIPImageProcessor",
                    processor_class="LlavaProcessor")
    if name == NEXT:
        # These keys re-serialize to exactly the 736 bytes of the hub file.
        return dict(**clip, **crop, do_pad=True,
                    image_grid_pinpoints=NEXT_PINPOINTS,
                    image_processor_type="LlavaNextImageProcessor",
                    processor_class="LlavaNextProcessor")
    if name == ONEVISION:
        return dict(clip, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True,
                    image_grid_pinpoints=OV_PINPOINTS,
                    image_processor_type="LlavaOnevisionImageProcessor",
                    processor_class="LlavaOnevisionProcessor", size={"height": 384, "width": 384})
    if name == QWEN25VL:
        return dict(clip, do_resize=True, image_processor_type="Qwen2VLImageProcessor",
                    max_pixels=12845056, merge_size=2, min_pixels=3136, patch_size=14,
                    processor_class="Qwen2_5_VLProcessor", temporal_patch_size=2)
    raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")


def processor_config(name: str) -> dict | None:
    if name in (LLAVA15, NEXT):
        return dict(image_token="<image>", num_additional_image_tokens=1, patch_size=14,
                    processor_class="LlavaProcessor" if name == LLAVA15 else "LlavaNextProcessor",
                    vision_feature_select_strategy="default")
    if name == ONEVISION:
        return dict(image_token="<image>", num_image_tokens=729,
                    processor_class="LlavaOnevisionProcessor", video_token="<video>",
                    vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full")
    return None  # Qwen2.5-VL ships none: processor_class sits in preprocessor_config.json


def generation_config(name: str) -> dict:
    # Qwen2.5-VL's sampling defaults are not on the fact sheet and are left out.
    ids = {LLAVA15: (1, 2, 32001), NEXT: (128000, 128009, None),
           ONEVISION: (151643, 151645, None), QWEN25VL: (151643, 151645, 151643)}[name]
    out = dict(bos_token_id=ids[0], eos_token_id=ids[1])
    if ids[2] is not None:
        out["pad_token_id"] = ids[2]
    return out


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


def build(name: str, out: Path) -> Path:
    """Write the look-alike of `name` into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(name), {
        "generation_config.json": generation_config(name),
        "preprocessor_config.json": preprocessor_config(name),
        "processor_config.json": processor_config(name),
        "chat_template.json": {"chat_template": TEMPLATES[name]},
    }, tokenizer_files(name))


def fingerprint() -> str:
    """Changes with this file and with every library whose behaviour shapes the files."""
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    for version in (transformers.__version__, tokenizers.__version__, torch.__version__):
        digest.update(version.encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("VISLENS_FIXTURE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vislens" / "fixtures"


def checkpoint_dir(name: str) -> Path:
    """The cached look-alike of `name`, built first if this source/version has none yet."""
    if name not in NAMES:
        raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")
    return publish(cache_root() / f"{name}-{fingerprint()}", lambda tmp: build(name, tmp))


def publish(target: Path, make) -> Path:
    """`target`, made by `make(directory)` in a temporary sibling first when it does not
    exist, then published with one atomic rename (a concurrent or interrupted session never
    sees half of it; whoever renames first wins)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        make(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not "someone else published it first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
