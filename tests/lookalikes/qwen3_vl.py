"""Qwen/Qwen3-VL-8B-Instruct (model_type `qwen3_vl`): 16-px patches merged 2x2, size
65536-16777216 px, mean/std 0.5, DeepStack with three injection layers (real: vision blocks
8, 16, 24 of 27 -> LM layers 0-2; here blocks 1-3 of 4 into a 4-layer LM, so a layer after
the injections remains), interleaved mRoPE, q/k norms, the Qwen3-VL chat format (no default
system prompt).

Values are those of public copies of the hub files (config.json in several repositories
that embed it; the preprocessor settings); values not seen in such a copy are marked
UNVERIFIED where they are chosen.
"""

from __future__ import annotations

from pathlib import Path

from .common import LM, QWEN25VL_SPECIALS, write_look_alike
from .qwen2_vl import qwen_tokenizer_files

NAME = "Qwen3-VL-8B-Instruct"
FAMILY = "qwen3_vl"
KV_HEADS = 1  # real: 8 of 32, kept grouped
HEAD_DIM = LM["hidden_size"] // LM["num_attention_heads"]  # 16
# real [24, 20, 20], interleaved (T on every third frequency, H and W between, T again past
# 3 x 20). With 8 frequencies H and W fit twice each: [4, 2, 2] keeps the pattern.
MROPE = [4, 2, 2]
LAYERS = 4
VISION = dict(deepstack_visual_indexes=[1, 2, 3], depth=4,
              hidden_act="gelu_pytorch_tanh", hidden_size=32, in_channels=3,
              initializer_range=0.02, intermediate_size=64, model_type="qwen3_vl",
              num_heads=2, num_position_embeddings=2304,
              out_hidden_size=LM["hidden_size"], patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2)
SPECIALS = QWEN25VL_SPECIALS + [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>"]
# Qwen3's tool / think markers are added tokens that are not special
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
               "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
               "<tool_response>", "</tool_response>", "<think>", "</think>"}


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the release ships them.
    model_max_length 262144 is the text config's max_position_embeddings (UNVERIFIED as a
    tokenizer_config value)."""
    return qwen_tokenizer_files(SPECIALS, NOT_SPECIAL, 262144)


# Qwen3-VL Instruct: no default system prompt (Qwen2-VL / 2.5-VL insert one); otherwise the
# same rendering: a system message first if given, content items in list order.
TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['content'] is string -%}{{ messages[0]['content'] }}"
    "{%- else -%}{%- for c in messages[0]['content'] -%}{%- if 'text' in c -%}{{ c['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- set images = namespace(n=0) -%}{%- set videos = namespace(n=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' or message['role'] == 'assistant' -%}"
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
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def model_config() -> dict:
    """config.json with the release's keys and values; LM and vision tower shrunk."""
    text = dict(attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
                dtype="float32", eos_token_id=151645, head_dim=HEAD_DIM, hidden_act="silu",
                hidden_size=LM["hidden_size"], initializer_range=0.02,
                intermediate_size=LM["intermediate_size"], max_position_embeddings=262144,
                model_type="qwen3_vl_text",
                num_attention_heads=LM["num_attention_heads"],
                num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS,
                rms_norm_eps=1e-6,
                rope_scaling={"mrope_interleaved": True, "mrope_section": MROPE,
                              "rope_type": "default"},
                rope_theta=5000000, tie_word_embeddings=False, use_cache=True,
                vocab_size=151936)
    return dict(architectures=["Qwen3VLForConditionalGeneration"], image_token_id=151655,
                model_type="qwen3_vl", text_config=text, tie_word_embeddings=False,
                torch_dtype="float32", video_token_id=151656,
                vision_config=dict(VISION), vision_end_token_id=151653,
                vision_start_token_id=151652)


def preprocessor_config() -> dict:
    # image_processor_type "...Fast" is what the release names; without torchvision
    # transformers loads the PIL processor of the same class, with these settings.
    return dict(image_mean=[0.5] * 3, image_processor_type="Qwen2VLImageProcessorFast",
                image_std=[0.5] * 3, merge_size=2, patch_size=16,
                processor_class="Qwen3VLProcessor",
                size={"longest_edge": 16777216, "shortest_edge": 65536},
                temporal_patch_size=2)


def video_preprocessor_config() -> dict:
    # Read by AutoProcessor (and refused without torchvision); sizes UNVERIFIED.
    return dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, merge_size=2, patch_size=16,
                processor_class="Qwen3VLProcessor",
                size={"longest_edge": 25165824, "shortest_edge": 4096}, temporal_patch_size=2,
                video_processor_type="Qwen3VLVideoProcessor")


def generation_config() -> dict:
    # token ids only: the release's sampling defaults are left out, as for the paper fixtures
    return dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "video_preprocessor_config.json": video_preprocessor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
