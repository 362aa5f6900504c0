"""llava-hf/llava-onevision-qwen2-7b-ov-hf (model_type `llava_onevision`): Qwen2-7B +
SigLIP-384/14, any-resolution tiles of 384 px (up to anyres_max_9, 36 pinpoints) + a base
view, a newline per row, Qwen2's byte-level tokenizer and ChatML.
Facts: docs/sources/real-checkpoints.md."""

from __future__ import annotations

from pathlib import Path

from .common import (
    LM,
    QWEN2_SPLIT,
    QWEN_SPECIALS,
    RESCALE,
    added_tokens_decoder,
    bytelevel_tokenizer,
    write_look_alike,
)

NAME = "llava-onevision-qwen2-7b-ov-hf"
FAMILY = "llava_onevision"
KV_HEADS = 2  # real: 4 of 28 (Qwen2), kept grouped
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              image_size=384, patch_size=14, vision_use_head=False,
              model_type="siglip_vision_model")
PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them."""
    specials = QWEN_SPECIALS + ["<image>", "<video>"]
    tok = bytelevel_tokenizer(QWEN2_SPLIT, 151643, specials, llama3=False)
    extra = specials[1:3]
    config = dict(add_prefix_space=False, additional_special_tokens=extra, bos_token=None,
                  clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
                  model_max_length=131072, pad_token="<|endoftext|>",
                  split_special_tokens=False, tokenizer_class="Qwen2Tokenizer",
                  unk_token=None)
    # padding_side "right" is the sibling 7b-si-hf's value (UNVERIFIED for ov).
    config.update(padding_side="right", processor_class="LlavaOnevisionProcessor")
    special = dict(additional_special_tokens=extra, eos_token="<|im_end|>",
                   pad_token="<|endoftext|>")
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


# the chat template, written from the documented format
TEMPLATE = (
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


def model_config() -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk."""
    return dict(
        architectures=["LlavaOnevisionForConditionalGeneration"],
        image_grid_pinpoints=PINPOINTS, image_token_index=151646,
        model_type="llava_onevision", projector_hidden_act="gelu",
        text_config=dict(model_type="qwen2", **LM, num_key_value_heads=KV_HEADS,
                         torch_dtype="float32", architectures=["Qwen2ForCausalLM"],
                         bos_token_id=151643, eos_token_id=151645,
                         max_position_embeddings=32768, max_window_layers=2,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072,
                         tie_word_embeddings=False, use_sliding_window=False,
                         vocab_size=152128),
        tie_word_embeddings=False, torch_dtype="float32", use_image_newline_parameter=True,
        video_token_index=151647, vision_aspect_ratio="anyres_max_9",
        vision_config=dict(SIGLIP), vision_feature_layer=-1,
        vision_feature_select_strategy="full")


def preprocessor_config() -> dict:
    return dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3, rescale_factor=RESCALE,
                do_pad=True, image_grid_pinpoints=PINPOINTS,
                image_processor_type="LlavaOnevisionImageProcessor",
                processor_class="LlavaOnevisionProcessor", size={"height": 384, "width": 384})


def processor_config() -> dict:
    return dict(image_token="<image>", num_image_tokens=729,
                processor_class="LlavaOnevisionProcessor", video_token="<video>",
                vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full")


def generation_config() -> dict:
    return dict(bos_token_id=151643, eos_token_id=151645)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "processor_config.json": processor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
