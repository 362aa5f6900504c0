"""llava-hf/llama3-llava-next-8b-hf (model_type `llava_next`): Llama-3-8B + CLIP
ViT-L/14-336, any-resolution tiles of 336 px (5 grid pinpoints) + a base view, a newline
per tile row, Llama-3's byte-level tokenizer and header-id chat format.
Facts: docs/sources/real-checkpoints.md."""

from __future__ import annotations

from pathlib import Path

from .common import (
    CLIP,
    CLIP_MEAN,
    CLIP_STD,
    HUGE,
    LM,
    RESCALE,
    added_tokens_decoder,
    bytelevel_tokenizer,
    write_look_alike,
)

NAME = "llama3-llava-next-8b-hf"
FAMILY = "llava_next"
KV_HEADS = 1  # real: 8 of 32 (Llama-3), kept grouped
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them."""
    tok = bytelevel_tokenizer(LLAMA3_SPLIT, 128000, LLAMA3_SPECIALS + ["<image>", "<pad>"],
                              llama3=True)
    # padding_side is UNVERIFIED for this checkpoint: left out, so transformers' default.
    config = dict(bos_token="<|begin_of_text|>", clean_up_tokenization_spaces=True,
                  eos_token="<|eot_id|>", model_input_names=["input_ids", "attention_mask"],
                  model_max_length=HUGE, pad_token="<pad>",
                  processor_class="LlavaNextProcessor",
                  tokenizer_class="PreTrainedTokenizerFast")
    special = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>")
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


# the chat template, written from the documented format
TEMPLATE = (
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


def model_config() -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk."""
    return dict(
        architectures=["LlavaNextForConditionalGeneration"], ignore_index=-100,
        image_grid_pinpoints=PINPOINTS, image_token_index=128256,
        model_type="llava_next", projector_hidden_act="gelu",
        text_config=dict(model_type="llama", **LM, num_key_value_heads=KV_HEADS,
                         torch_dtype="float32", architectures=["LlamaForCausalLM"],
                         bos_token_id=128000, eos_token_id=128009,
                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=500000.0, vocab_size=128320),
        tie_word_embeddings=False, torch_dtype="float32", use_image_newline_parameter=True,
        vision_config=dict(CLIP), vision_feature_layer=-2,
        vision_feature_select_strategy="default", vocab_size=128320)


def preprocessor_config() -> dict:
    # These keys re-serialize to exactly the 736 bytes of the hub file.
    return dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, rescale_factor=RESCALE,
                crop_size={"height": 336, "width": 336}, do_center_crop=True,
                size={"shortest_edge": 336}, do_pad=True, image_grid_pinpoints=PINPOINTS,
                image_processor_type="LlavaNextImageProcessor",
                processor_class="LlavaNextProcessor")


def processor_config() -> dict:
    return dict(image_token="<image>", num_additional_image_tokens=1, patch_size=14,
                processor_class="LlavaNextProcessor", vision_feature_select_strategy="default")


def generation_config() -> dict:
    return dict(bos_token_id=128000, eos_token_id=128009)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "processor_config.json": processor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
