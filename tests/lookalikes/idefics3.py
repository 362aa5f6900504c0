"""HuggingFaceTB/SmolVLM-Instruct (model_type `idefics3`): SmolLM2-1.7B + SigLIP-384/14, the
1536-px longest edge split into 384-px crops + a global view, pixel shuffle 3 -> 81 tokens
per crop.

Values are those of public copies of the hub files where they could be found; what could
not be verified is marked UNVERIFIED where it is chosen, with the reason for the choice.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    LM,
    RESCALE,
    added_tokens_decoder,
    bytelevel_bpe,
    write_look_alike,
)

NAME = "SmolVLM-Instruct"
FAMILY = "idefics3"
KV_HEADS = 4  # real: 32 of 32 (SmolLM2-1.7B)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
SMOLLM2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
    "<jupyter_script>", "<empty_output>",
]
# SmolVLM-Instruct adds three tokens after SmolLM2's 49152 (49155 = its vocab_size);
# <row_r_col_c> and <global-img> are not among them, so they are text of several pieces
# (UNVERIFIED: inferred from the 49155-row embedding and image_token_id 49153 of a public
# copy of its config.json)
ADDED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def smollm2_tokenizer():
    """SmolLM2: GPT-2 style byte-level BPE, single digits, no BOS added."""
    from tokenizers import pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return bytelevel_bpe(pre, None, SMOLLM2_SPECIALS, 49152, ADDED,
                         lambda tok: processors.ByteLevel(trim_offsets=False))


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them;
    tokenizer_config keys beyond the special tokens are UNVERIFIED."""
    tok = smollm2_tokenizer()
    special = dict(additional_special_tokens=ADDED, bos_token="<|im_start|>",
                   eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                   unk_token="<|endoftext|>")
    config = dict(special, add_prefix_space=False, clean_up_tokenization_spaces=False,
                  model_max_length=16384, processor_class="Idefics3Processor",
                  tokenizer_class="GPT2Tokenizer")
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


# One <|im_start|> opens the conversation; a turn is its capitalised role, ":" (no space when
# its content opens with an image, ": " otherwise), the items in list order (image ->
# "<image>"), "<end_of_utterance>\n"; the generation prompt is "Assistant:".
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def model_config() -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk (real:
    text 2048 / 8192 / 24 layers / 32 heads, vision 1152 / 4304 / 27 layers / 16 heads)."""
    # UNVERIFIED beyond a public copy of config.json's keys: vision_config's own
    # model_type and max_position_embeddings 16384
    return dict(
        architectures=["Idefics3ForConditionalGeneration"], image_token_id=49153,
        model_type="idefics3", scale_factor=3, tie_word_embeddings=False,
        torch_dtype="float32", vocab_size=49155,
        text_config=dict(**LM, num_key_value_heads=KV_HEADS, torch_dtype="float32",
                         model_type="llama", architectures=["LlamaForCausalLM"],
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, head_dim=16,
                         max_position_embeddings=16384, rms_norm_eps=1e-5,
                         rope_theta=273768.0, tie_word_embeddings=False,
                         vocab_size=49155),
        vision_config=dict(TOWER, image_size=384, patch_size=14))


def preprocessor_config() -> dict:
    return dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                rescale_factor=RESCALE, do_image_splitting=True, do_pad=True,
                image_mean=[0.5] * 3, image_processor_type="Idefics3ImageProcessor",
                image_std=[0.5] * 3, max_image_size={"longest_edge": 384},
                processor_class="Idefics3Processor", resample=1,
                size={"longest_edge": 1536})


def processor_config() -> dict:
    return dict(image_seq_len=81, processor_class="Idefics3Processor")


def generation_config() -> dict:
    """bos / eos / pad ids. UNVERIFIED: eos (<end_of_utterance>, which ends every turn of its
    template) and pad."""
    return dict(bos_token_id=1, eos_token_id=49154, pad_token_id=2)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "processor_config.json": processor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
