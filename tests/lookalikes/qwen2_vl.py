"""Qwen/Qwen2-VL-7B-Instruct (model_type `qwen2_vl`): the flat config of the 7B release,
14-px patches merged 2x2, CLIP normalisation, min/max pixels 3136 / 12845056, the
Qwen2.5-VL chat format (default system prompt, content in list order).

Values are those of public copies of the hub files (Qwen2-VL-7B-Instruct's text and vision
sizes); values not seen in such a copy are marked UNVERIFIED where they are chosen.
"""

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
from .qwen2_5_vl import TEMPLATE

NAME = "Qwen2-VL-7B-Instruct"
FAMILY = "qwen2_vl"
KV_HEADS = 2  # real: 4 of 28, kept grouped
# real [16, 24, 24] (sum 64 = head_dim 128 / 2) scaled by 1/8
MROPE = [2, 3, 3]
VISION = dict(depth=2, embed_dim=32, mlp_ratio=4, num_heads=2, in_chans=3,
              hidden_size=LM["hidden_size"], patch_size=14, spatial_merge_size=2,
              spatial_patch_size=14, temporal_patch_size=2)


def qwen_tokenizer_files(specials: list[str], not_special: set[str] | frozenset[str],
                         model_max_length: int) -> tuple[object, dict, dict]:
    """Qwen2 byte-level BPE (no BOS) padded to 151643 entries, then the release's `specials`
    as added tokens (those in `not_special` added but not special); its tokenizer_config and
    special_tokens_map. Qwen3-VL's fixture uses it too."""
    from tokenizers import AddedToken

    tok = bytelevel_tokenizer(QWEN2_SPLIT, 151643, [], llama3=False)
    tok.add_tokens([AddedToken(t, special=t not in not_special, normalized=False)
                    for t in specials])
    extra = [t for t in specials[1:] if t not in not_special]
    config = dict(add_prefix_space=False, additional_special_tokens=extra, bos_token=None,
                  clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
                  model_max_length=model_max_length,
                  pad_token="<|endoftext|>", split_special_tokens=False,
                  tokenizer_class="Qwen2Tokenizer", unk_token=None)
    special = dict(additional_special_tokens=extra, eos_token="<|im_end|>",
                   pad_token="<|endoftext|>")
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the release ships them.
    model_max_length 32768 is the text config's max_position_embeddings (UNVERIFIED as a
    tokenizer_config value)."""
    return qwen_tokenizer_files(QWEN25VL_SPECIALS, frozenset(), 32768)


def model_config() -> dict:
    """config.json with the release's keys and values; LM and vision tower shrunk."""
    # The released file is flat, like Qwen2.5-VL's. max_position_embeddings 32768 and
    # the mrope rope_scaling are UNVERIFIED for this file (values of the 2-VL family).
    return dict(
        architectures=["Qwen2VLForConditionalGeneration"], attention_dropout=0.0,
        bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
        vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
        video_token_id=151656, hidden_act="silu", **LM, initializer_range=0.02,
        max_position_embeddings=32768, max_window_layers=LM["num_hidden_layers"],
        model_type="qwen2_vl", num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6,
        rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=False,
        torch_dtype="float32", use_cache=True, use_sliding_window=False,
        vision_config=dict(VISION),
        rope_scaling={"type": "mrope", "mrope_section": MROPE}, vocab_size=152064)


def preprocessor_config() -> dict:
    return dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, rescale_factor=RESCALE,
                image_processor_type="Qwen2VLImageProcessor", max_pixels=12845056,
                merge_size=2, min_pixels=3136, patch_size=14,
                processor_class="Qwen2VLProcessor", temporal_patch_size=2)


def generation_config() -> dict:
    # token ids only: the release's sampling defaults are left out, as for the paper fixtures
    return dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
