"""mistralai/Mistral-Small-3.1-24B-Instruct-2503 (model_type `mistral3`): Mistral + Pixtral
at up to 1540 px, a 2x2 patch merger, [IMG_BREAK] after each row and [IMG_END].

Values are those of public copies of the hub files where they could be found; what could
not be verified is marked UNVERIFIED where it is chosen, with the reason for the choice.
Deviation on purpose: the release's template writes today's date (strftime_now) into its
default system prompt; the look-alike writes a fixed date, so that states recorded for a
fitted answer head stay valid from one day to the next.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    CLIP_MEAN,
    CLIP_STD,
    LM,
    RESCALE,
    added_tokens_decoder,
    bytelevel_bpe,
    write_look_alike,
)

NAME = "Mistral-Small-3.1-24B-Instruct-2503"
FAMILY = "mistral3"
KV_HEADS = 1  # real: 8 of 32, kept grouped
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
# Mistral Small has head_dim * heads != hidden (128 * 32 = 4096 of 5120): the look-alike
# keeps that (8 * 4 = 32 of 64)
SHORT_HEAD_DIM = 8
# Tekken (Mistral's tiktoken-style BPE): 1000 control tokens, then 130072 byte-level BPE
# tokens. Ids 0-19 as mistral-common's tokenizer v7 names them (UNVERIFIED from a hub file);
# the rest are <SPECIAL_n>.
TEKKEN_CONTROL = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
] + [f"<SPECIAL_{i}>" for i in range(20, 1000)]
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

def tekken_tokenizer():
    """Tekken: byte-level BPE after a split regex, control tokens first, BOS added."""
    from tokenizers import Regex, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def post(tok):
        return processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                             special_tokens=[("<s>", 1)])

    return bytelevel_bpe(pre, None, TEKKEN_CONTROL, 131072, [], post)


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them;
    tokenizer_config keys beyond the special tokens are UNVERIFIED (tokenizer_class:
    PreTrainedTokenizerFast, as the converted Pixtral repositories use)."""
    tok = tekken_tokenizer()
    special = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    config = dict(special, clean_up_tokenization_spaces=False, legacy=False,
                  model_max_length=131072, processor_class="PixtralProcessor",
                  tokenizer_class="PreTrainedTokenizerFast")
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


# Mistral Small 3.1: BOS, the default system prompt in [SYSTEM_PROMPT] (the real one dates
# itself with strftime_now; fixed here, see the module docstring), then [INST] items in list
# order (image -> "[IMG]") [/INST]; no generation prompt: the answer follows [/INST]. The
# system prompt's wording is a public copy of the 3.x template's.
SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French "
    "startup headquartered in Paris.\\nYour knowledge base was last updated on 2023-10-01. "
    "The current date is 2025-03-17.\\n\\nWhen you're not sure about some information, you "
    "say that you don't have the information and don't make up anything.\\nIf the user's "
    "question is not clear, ambiguous, or does not provide enough context for you to "
    "accurately answer the question, you do not try to answer it right away and you rather "
    "ask the user to clarify their request (e.g. \\\"What are some good restaurants around "
    "me?\\\" => \\\"Where are you?\\\" or \\\"When is the next flight to Tokyo\\\" => \\\"Where "
    "do you travel from?\\\")"
)
TEMPLATE = (
    "{%- set default_system_message = \"" + SYSTEM + "\" %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] == 'image' or block['type'] == 'image_url' %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message "
    "content!') }}{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
)


def model_config() -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk (real:
    text 5120 / 32768 / 40 layers / 32 heads, vision 1024 / 4096 / 24 / 16)."""
    # UNVERIFIED: the vision tower's hidden_act ("silu" as in the released config copy
    # found; Pixtral's default is gelu)
    return dict(
        architectures=["Mistral3ForConditionalGeneration"], image_token_index=10,
        model_type="mistral3", multimodal_projector_bias=False,
        projector_hidden_act="gelu", spatial_merge_size=2, tie_word_embeddings=False,
        torch_dtype="float32", vision_feature_layer=-1,
        text_config=dict(**LM, num_key_value_heads=KV_HEADS, torch_dtype="float32",
                         model_type="mistral", head_dim=SHORT_HEAD_DIM,
                         hidden_act="silu", max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=1000000000.0, sliding_window=None,
                         tie_word_embeddings=False, vocab_size=131072),
        vision_config=dict(TOWER, model_type="pixtral", head_dim=16, hidden_act="silu",
                           image_size=1540, num_channels=3, patch_size=14,
                           rope_theta=10000.0))


def preprocessor_config() -> dict:
    return dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                rescale_factor=RESCALE, image_mean=CLIP_MEAN,
                image_processor_type="PixtralImageProcessor",
                image_std=CLIP_STD, patch_size={"height": 14, "width": 14},
                processor_class="PixtralProcessor", resample=3,
                size={"longest_edge": 1540})


def processor_config() -> dict:
    return dict(image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
                image_token="[IMG]", patch_size=14, processor_class="PixtralProcessor",
                spatial_merge_size=2)


def generation_config() -> dict:
    return dict(bos_token_id=1, eos_token_id=2, pad_token_id=11)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "processor_config.json": processor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
