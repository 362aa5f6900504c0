"""Qwen/Qwen2.5-VL-7B-Instruct (model_type `qwen2_5_vl`): Qwen2.5-7B + its own ViT (14-px
patches merged 2x2, window attention with full attention every 8th block, mRoPE), images at
their own size between 3136 and 12845056 pixels, ChatML with a default system prompt.
Facts: docs/sources/real-checkpoints.md."""

from __future__ import annotations

from pathlib import Path

from .common import (
    CLIP_MEAN,
    CLIP_STD,
    LM,
    QWEN2_SPLIT,
    QWEN25VL_SPECIALS,
    RESCALE,
    added_tokens_decoder,
    bytelevel_tokenizer,
    write_look_alike,
)

NAME = "Qwen2.5-VL-7B-Instruct"
FAMILY = "qwen2_5_vl"
KV_HEADS = 2  # real: 4 of 28 (Qwen2.5), kept grouped
# mrope_section must sum to head_dim / 2 = 8; the real [16, 24, 24] scaled by 1/8.
MROPE_SECTION = [2, 3, 3]
# Real: depth 32 with full attention in the last block of each group of 8 ([7, 15, 23, 31]);
# depth 4 keeps both window and full-attention blocks ([1, 3]).
VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, hidden_act="silu",
              in_chans=3, out_hidden_size=LM["hidden_size"], patch_size=14,
              spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2,
              window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2)


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them."""
    specials = QWEN25VL_SPECIALS
    tok = bytelevel_tokenizer(QWEN2_SPLIT, 151643, specials, llama3=False)
    extra = specials[1:]
    config = dict(add_prefix_space=False, additional_special_tokens=extra, bos_token=None,
                  clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
                  model_max_length=131072, pad_token="<|endoftext|>",
                  split_special_tokens=False, tokenizer_class="Qwen2Tokenizer",
                  unk_token=None)
    special = dict(additional_special_tokens=extra, eos_token="<|im_end|>",
                   pad_token="<|endoftext|>")
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


# the chat template, written from the documented format (Qwen2-VL's too)
TEMPLATE = (
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


def model_config() -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk."""
    # The released file is flat (text fields at the top level), not nested.
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], attention_dropout=0.0,
        bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
        vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
        video_token_id=151656, hidden_act="silu", **LM, initializer_range=0.02,
        max_position_embeddings=128000, max_window_layers=2, model_type="qwen2_5_vl",
        num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, rope_theta=1000000.0,
        sliding_window=32768, tie_word_embeddings=False, torch_dtype="float32",
        use_cache=True, use_sliding_window=False, vision_config=dict(VISION),
        rope_scaling={"type": "mrope", "mrope_section": MROPE_SECTION}, vocab_size=152064)


def preprocessor_config() -> dict:
    return dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, rescale_factor=RESCALE,
                image_processor_type="Qwen2VLImageProcessor", max_pixels=12845056,
                merge_size=2, min_pixels=3136, patch_size=14,
                processor_class="Qwen2_5_VLProcessor", temporal_patch_size=2)


def generation_config() -> dict:
    # Qwen2.5-VL's sampling defaults are not on the fact sheet and are left out.
    return dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`. No processor_config.json:
    Qwen2.5-VL ships none (processor_class sits in preprocessor_config.json)."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
