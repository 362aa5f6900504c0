"""Tiny random-weight VLMs with REAL image geometry, built offline for tests.

The geometry (image size, patch size, anyres pinpoints, merge size, processor
options) is that of the released checkpoints; only the widths and depths are
tiny, so the image-token maps are tested against what the real processors do
without downloading anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "user assistant describe this image . is there a red blue green circle square in ? "
    "what shape color it yes no the object"
).split()
SPECIALS = [
    "<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>",
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:"
    "{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: the specials every family needs plus a few words."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["USER:", "ASSISTANT:"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit()]
    )
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )
    fast.padding_side = "left"
    return fast


def _text_cfg(kind: str, vocab: int) -> dict:
    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if kind == "qwen":
        common.update(
            model_type="qwen2_5_vl_text",
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                             "rope_theta": 10000.0},
        )
    else:
        common.update(model_type="llama")
    return common


def build(family: str, seed: int = 0, attn: str = "sdpa"):
    """(model, processor) for one family with the real geometry and random weights."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        LlavaProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    vocab = len(tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    clip = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                image_size=336, patch_size=14, projection_dim=16)
    if family == "llava":
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(**clip), text_config=_text_cfg("llama", vocab),
            image_token_id=image_id, vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(cfg)
        ip = LlavaImageProcessorPil(size={"shortest_edge": 336},
                                    crop_size={"height": 336, "width": 336})
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    elif family == "llava_next":
        pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        cfg = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**clip), text_config=_text_cfg("llama", vocab),
            image_token_id=image_id, image_grid_pinpoints=pins, vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(cfg)
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                        crop_size={"height": 336, "width": 336},
                                        image_grid_pinpoints=pins)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    elif family == "llava_onevision":
        pins = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
        sig = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, image_size=384, patch_size=14)
        cfg = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**sig), text_config=_text_cfg("llama", vocab),
            image_token_id=image_id, video_token_id=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=pins, vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        )
        model = LlavaOnevisionForConditionalGeneration(cfg)
        ip = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                             image_grid_pinpoints=pins)
        proc = _images_only(LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tok, video_processor=_video(),
                                       num_image_tokens=729,
                                       vision_feature_select_strategy="full",
                                       vision_aspect_ratio="anyres_max_9",
                                       chat_template=LLAVA_TEMPLATE)
    elif family == "qwen2_5_vl":
        vis = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[1])
        text = _text_cfg("qwen", vocab)
        cfg = Qwen2_5_VLConfig(
            vision_config=vis, text_config=text,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
        model = Qwen2_5_VLForConditionalGeneration(cfg)
        ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56,
                                            "longest_edge": 28 * 28 * 256})
        proc = _images_only(Qwen2_5_VLProcessor)(
            image_processor=ip, tokenizer=tok, video_processor=_video(),
                                   chat_template=QWEN_TEMPLATE)
    else:
        raise ValueError(family)
    model.eval()
    model.set_attn_implementation(attn)
    return model, proc


def save(family: str, path: Path, seed: int = 0) -> Path:
    """Write a tiny model + processor as a local HF directory (what `vislens.load` reads).

    Video-capable processors cannot save their (torchvision-only) video part
    here, so their pieces are written one by one, as a checkpoint ships them.
    """
    import json

    model, proc = build(family, seed)
    model.save_pretrained(path)
    if family in ("llava", "llava_next"):
        proc.save_pretrained(path)
        return path
    proc.image_processor.save_pretrained(path)
    proc.tokenizer.save_pretrained(path)
    (Path(path) / "chat_template.jinja").write_text(proc.chat_template)
    extra = {"processor_class": type(proc).__name__}
    if family == "llava_onevision":
        extra.update(num_image_tokens=729, vision_feature_select_strategy="full",
                     vision_aspect_ratio="anyres_max_9")
    (Path(path) / "processor_config.json").write_text(json.dumps(extra))
    return path


def _video():
    from vislens.models.novideo import NoVideoProcessor

    return NoVideoProcessor()


def _images_only(cls):
    from vislens.models.novideo import images_only

    return images_only(cls)


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def save_gemma3(path: Path, tokens_per_image: int = 16) -> Path:
    """A tiny Gemma 3 (a family vislens has no layout for): the generic fallback's fixture."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    vocab = {t: i for i, t in enumerate(specials + ["user", "model"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>"})
    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, sliding_window=64),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         image_size=224, patch_size=14),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=fast.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=fast.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=fast.convert_tokens_to_ids("<image_soft_token>"))
    Gemma3ForConditionalGeneration(cfg).eval().save_pretrained(path)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 224, "width": 224}),
                    tokenizer=fast, chat_template=GEMMA3_TEMPLATE,
                    image_seq_length=tokens_per_image).save_pretrained(path)
    return Path(path)
