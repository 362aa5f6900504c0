"""OpenGVLab/InternVL3-8B-hf (model_type `internvl`): Qwen2.5-7B + InternViT-300M-448, up to
12 tiles + a thumbnail, pixel shuffle 0.5 -> 256 tokens per tile.

Values are those of public copies of the hub files where they could be found; what could
not be verified is marked UNVERIFIED where it is chosen, with the reason for the choice.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    LM,
    QWEN2_SPLIT,
    QWEN25VL_SPECIALS,
    RESCALE,
    added_tokens_decoder,
    bytelevel_bpe,
    write_look_alike,
)

NAME = "InternVL3-8B-hf"
FAMILY = "internvl"
KV_HEADS = 2  # real: 4 of 28 (Qwen2.5-7B), kept grouped
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
SPECIALS = QWEN25VL_SPECIALS + [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",  # Qwen2.5's 151643-151664
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
    "</box>",  # added by transformers' InternVL conversion: 151665-151673
]


def qwen_internvl_tokenizer():
    """Qwen2.5's byte-level BPE (NFC, no BOS) with InternVL's image tokens."""
    from tokenizers import Regex, normalizers, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return bytelevel_bpe(pre, normalizers.NFC(), [], 151643, SPECIALS,
                         lambda tok: processors.ByteLevel(trim_offsets=False))


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them."""
    tok = qwen_internvl_tokenizer()
    extra = SPECIALS[1:]
    special = dict(additional_special_tokens=extra, eos_token="<|im_end|>",
                   pad_token="<|endoftext|>")
    config = dict(special, add_prefix_space=False, bos_token=None,
                  clean_up_tokenization_spaces=False, errors="replace",
                  extra_special_tokens={"context_image_token": "<IMG_CONTEXT>",
                                        "end_image_token": "</img>",
                                        "start_image_token": "<img>",
                                        "video_token": "<video>"},
                  model_max_length=8192, processor_class="InternVLProcessor",
                  split_special_tokens=False, tokenizer_class="Qwen2Tokenizer",
                  unk_token=None)
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


# InternVL3-hf (transformers' conversion script): ChatML, items in list order, an image is
# "<IMG_CONTEXT>\n" (the processor expands it to <img> + 256 per tile + </img>); no system
# prompt of its own.
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def model_config() -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk (real:
    text 3584 / 18944 / 28 layers / 28 heads, vision 1024 / 4096 / 24 / 16)."""
    # transformers' conversion: image_token_id 151667, eos forced to 151645, vision
    # with absolute position embeddings; rope_scaling dynamic x2 of InternVL3's
    # llm_config is UNVERIFIED and left out (it acts only past 32768 positions)
    return dict(
        architectures=["InternVLForConditionalGeneration"], downsample_ratio=0.5,
        image_seq_length=256, image_token_id=151667, model_type="internvl",
        projector_hidden_act="gelu", tie_word_embeddings=False, torch_dtype="float32",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        text_config=dict(**LM, num_key_value_heads=KV_HEADS, torch_dtype="float32",
                         model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                         bos_token_id=151643, eos_token_id=151645,
                         max_position_embeddings=32768, max_window_layers=2,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=None,
                         tie_word_embeddings=False, use_sliding_window=False,
                         vocab_size=151674),
        vision_config=dict(TOWER, model_type="internvl_vision", attention_bias=True,
                           hidden_act="gelu", image_size=[448, 448], patch_size=[14, 14],
                           layer_norm_eps=1e-6, layer_scale_init_value=0.1,
                           norm_type="layer_norm", use_absolute_position_embeddings=True,
                           use_mean_pooling=True, use_qk_norm=False))


def preprocessor_config() -> dict:
    # crop_to_patches is off here and turned on by InternVLProcessor's call defaults
    return dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                rescale_factor=RESCALE, crop_to_patches=False,
                image_mean=[0.485, 0.456, 0.406],
                image_processor_type="GotOcr2ImageProcessorFast",
                image_std=[0.229, 0.224, 0.225], max_patches=12, min_patches=1,
                processor_class="InternVLProcessor", resample=3,
                size={"height": 448, "width": 448})


def processor_config() -> dict:
    return dict(image_seq_length=256, processor_class="InternVLProcessor")


def generation_config() -> dict:
    """bos / eos ids. UNVERIFIED: eos 151645 as the converted text config's."""
    return dict(bos_token_id=151643, eos_token_id=151645)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "processor_config.json": processor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
