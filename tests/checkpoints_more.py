"""Offline look-alikes of four more checkpoints, one per family of issue #14 part 2.

Built as checkpoints.py builds the paper fixtures: the real model and processor
classes with the checkpoints' processing settings, special-token ids, tokenizer
kind and chat format, random weights of a shrunk language model and vision tower,
real vocabulary sizes. They are

- SMOLVLM: HuggingFaceTB/SmolVLM-Instruct, model_type `idefics3` (SmolLM2-1.7B
  + SigLIP-384/14, 1536-px longest edge split into 384-px crops + a global view,
  pixel shuffle 3 -> 81 tokens per crop);
- INTERNVL: OpenGVLab/InternVL3-8B-hf, `internvl` (Qwen2.5-7B + InternViT-300M-448,
  up to 12 tiles + thumbnail, pixel shuffle 0.5 -> 256 tokens per tile);
- MISTRAL3: mistralai/Mistral-Small-3.1-24B-Instruct-2503, `mistral3` (Mistral
  + Pixtral at up to 1540 px, 2x2 patch merger, [IMG_BREAK] / [IMG_END]);
- PALIGEMMA: google/paligemma2-3b-mix-224, `paligemma` (Gemma 2 2B + SigLIP-224/14,
  256 tokens, prefix LM, soft-capped attention and logits).

Values are those of public copies of the hub files where they could be found;
what could not be verified is marked UNVERIFIED where it is chosen, with the
reason for the choice. Deviations on purpose:

- Mistral Small 3.1's template writes today's date (strftime_now) into its default
  system prompt; the look-alike writes a fixed date, so that states recorded for a
  fitted answer head stay valid from one day to the next.

`checkpoint_dir(name)` caches each directory as checkpoints.checkpoint_dir does
(key: this file, checkpoints.py and the library versions; checkpoints.publish).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from checkpoints import (
    CLIP_MEAN,
    CLIP_STD,
    HUGE,
    LM,
    QWEN2_SPLIT,
    QWEN25VL_SPECIALS,
    RESCALE,
    _added_tokens_decoder,
    _fillers,
    _train_bpe,
    cache_root,
    corpus,
    publish,
    write_look_alike,
)

SMOLVLM = "SmolVLM-Instruct"
INTERNVL = "InternVL3-8B-hf"
MISTRAL3 = "Mistral-Small-3.1-24B-Instruct-2503"
PALIGEMMA = "paligemma2-3b-mix-224"
NAMES = (SMOLVLM, INTERNVL, MISTRAL3, PALIGEMMA)
FAMILY = {SMOLVLM: "idefics3", INTERNVL: "internvl", MISTRAL3: "mistral3",
          PALIGEMMA: "paligemma"}

# ---- shrunk sizes (real: see each model_config) -------------------------------------------------
# real KV heads: 32 of 32 (SmolLM2-1.7B), 4 of 28 (Qwen2.5-7B), 8 of 32 (Mistral Small), 4 of 8
# (Gemma 2 2B): kept grouped as in checkpoints.py
KV_HEADS = {SMOLVLM: 4, INTERNVL: 2, MISTRAL3: 1, PALIGEMMA: 2}
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
# Mistral Small and Gemma 2 have head_dim * heads != hidden (128 * 32 = 4096 of 5120;
# 256 * 8 = 2048 of 2304): the look-alikes keep that (8 * 4 = 32 of 64)
SHORT_HEAD_DIM = 8

# ---- tokenizers ---------------------------------------------------------------------------------
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
SMOLVLM_ADDED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
INTERNVL_SPECIALS = QWEN25VL_SPECIALS + [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",  # Qwen2.5's 151643-151664
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
    "</box>",  # added by transformers' InternVL conversion: 151665-151673
]
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
# Gemma: ids 0-4, the turn markers at 106 / 107; where the unused and byte tokens sit
# between them and the merges is UNVERIFIED (it changes no id vislens reads).
GEMMA_HEAD = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]"]
              + [f"<unused{i}>" for i in range(100)] + ["<start_of_turn>", "<end_of_turn>"])
PALIGEMMA_EXTRA = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]


def _bytelevel(pre, normalizer, head: list[str], n_total: int, tail: list[str], post):
    """Byte-level BPE: `head` specials first, merges learned on the shared corpus, fillers to
    `n_total` ids, then `tail` added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre
    trainer_tok.normalizer = normalizer
    tokens, merges = _train_bpe(trainer_tok, pre_tokenizers.ByteLevel.alphabet())
    regular = head + tokens
    regular += _fillers(len(regular), n_total)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(regular)}, merges=merges))
    tok.pre_tokenizer = pre
    tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(head + tail)
    if post is not None:
        tok.post_processor = post(tok)
    return tok


def smollm2_tokenizer():
    """SmolLM2: GPT-2 style byte-level BPE, single digits, no BOS added."""
    from tokenizers import pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return _bytelevel(pre, None, SMOLLM2_SPECIALS, 49152, SMOLVLM_ADDED,
                      lambda tok: processors.ByteLevel(trim_offsets=False))


def qwen_internvl_tokenizer():
    """Qwen2.5's byte-level BPE (NFC, no BOS) with InternVL's image tokens."""
    from tokenizers import Regex, normalizers, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _bytelevel(pre, normalizers.NFC(), [], 151643, INTERNVL_SPECIALS,
                      lambda tok: processors.ByteLevel(trim_offsets=False))


def tekken_tokenizer():
    """Tekken: byte-level BPE after a split regex, control tokens first, BOS added."""
    from tokenizers import Regex, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def post(tok):
        return processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                             special_tokens=[("<s>", 1)])

    return _bytelevel(pre, None, TEKKEN_CONTROL, 131072, [], post)


def gemma_tokenizer():
    """Gemma: SentencePiece-style BPE over "▁"-joined text with byte fallback and NO dummy
    prefix ("What is" -> "What", "▁is"); BOS added; PaliGemma's 1152 location and
    segmentation tokens after the 256000, then <image>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    norm = normalizers.Replace(" ", "▁")
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = norm
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    alphabet = sorted({ch for line in corpus() for ch in line.replace(" ", "▁")} | {"▁"})
    tokens, merges = _train_bpe(trainer_tok, alphabet)
    head = GEMMA_HEAD + [f"<0x{b:02X}>" for b in range(256)]
    regular = head + [t for t in tokens if t not in head]
    regular += _fillers(len(regular), 256000) + PALIGEMMA_EXTRA
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(regular)}, merges=merges,
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens(GEMMA_HEAD[:6] + GEMMA_HEAD[-2:])
    tok.add_tokens(PALIGEMMA_EXTRA)
    tok.add_special_tokens(["<image>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)])
    return tok


def tokenizer_files(name: str) -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them.

    tokenizer_config keys beyond the special tokens are UNVERIFIED for SmolVLM-Instruct,
    Mistral Small 3.1 (tokenizer_class: PreTrainedTokenizerFast, as the converted Pixtral
    repositories use) and paligemma2-3b-mix-224 (padding_side left out: the default).
    """
    if name == SMOLVLM:
        tok = smollm2_tokenizer()
        special = dict(additional_special_tokens=SMOLVLM_ADDED, bos_token="<|im_start|>",
                       eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                       unk_token="<|endoftext|>")
        config = dict(special, add_prefix_space=False, clean_up_tokenization_spaces=False,
                      model_max_length=16384, processor_class="Idefics3Processor",
                      tokenizer_class="GPT2Tokenizer")
    elif name == INTERNVL:
        tok = qwen_internvl_tokenizer()
        extra = INTERNVL_SPECIALS[1:]
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
    elif name == MISTRAL3:
        tok = tekken_tokenizer()
        special = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        config = dict(special, clean_up_tokenization_spaces=False, legacy=False,
                      model_max_length=131072, processor_class="PixtralProcessor",
                      tokenizer_class="PreTrainedTokenizerFast")
    elif name == PALIGEMMA:
        tok = gemma_tokenizer()
        special = dict(additional_special_tokens=["<image>"], bos_token="<bos>",
                       eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
        config = dict(special, add_bos_token=True, add_eos_token=False,
                      clean_up_tokenization_spaces=False, model_max_length=HUGE,
                      processor_class="PaliGemmaProcessor", sp_model_kwargs={},
                      spaces_between_special_tokens=False, tokenizer_class="GemmaTokenizer",
                      use_default_system_prompt=False)
    else:
        raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")
    config = {"added_tokens_decoder": _added_tokens_decoder(tok), **config}
    return tok, config, special


# ---- chat templates -----------------------------------------------------------------------------
# SmolVLM-Instruct: one <|im_start|> opens the conversation; a turn is its capitalised role,
# ":" (no space when its content opens with an image, ": " otherwise), the items in list
# order (image -> "<image>"), "<end_of_utterance>\n"; the generation prompt is "Assistant:".
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# InternVL3-hf (transformers' conversion script): ChatML, items in list order, an image is
# "<IMG_CONTEXT>\n" (the processor expands it to <img> + 256 per tile + </img>); no system
# prompt of its own.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral Small 3.1: BOS, the default system prompt in [SYSTEM_PROMPT] (the real one dates
# itself with strftime_now; fixed here, see the module docstring), then [INST] items in list
# order (image -> "[IMG]") [/INST]; no generation prompt: the answer follows [/INST]. The
# system prompt's wording is a public copy of the 3.x template's.
MISTRAL3_SYSTEM = (
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
MISTRAL3_TEMPLATE = (
    "{%- set default_system_message = \"" + MISTRAL3_SYSTEM + "\" %}"
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
TEMPLATES = {SMOLVLM: SMOLVLM_TEMPLATE, INTERNVL: INTERNVL_TEMPLATE, MISTRAL3: MISTRAL3_TEMPLATE,
             PALIGEMMA: None}  # PaliGemma has none: "<image>"*n + BOS + text + "\n"


# ---- configs in the hub layout ------------------------------------------------------------------
def _text(name: str, **real) -> dict:
    return dict(**LM, num_key_value_heads=KV_HEADS[name], torch_dtype="float32", **real)


def model_config(name: str) -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk.

    Real sizes: SmolVLM-Instruct text 2048 / 8192 / 24 layers / 32 heads, vision 1152 /
    4304 / 27 layers / 16 heads; InternVL3-8B text 3584 / 18944 / 28 / 28, vision 1024 /
    4096 / 24 / 16; Mistral Small 3.1 text 5120 / 32768 / 40 / 32, vision 1024 / 4096 /
    24 / 16; PaliGemma 2 3B text 2304 / 9216 / 26 / 8, vision 1152 / 4304 / 27 / 16.
    """
    if name == SMOLVLM:
        # UNVERIFIED beyond a public copy of config.json's keys: vision_config's own
        # model_type and max_position_embeddings 16384
        return dict(
            architectures=["Idefics3ForConditionalGeneration"], image_token_id=49153,
            model_type="idefics3", scale_factor=3, tie_word_embeddings=False,
            torch_dtype="float32", vocab_size=49155,
            text_config=_text(name, model_type="llama", architectures=["LlamaForCausalLM"],
                              bos_token_id=1, eos_token_id=2, pad_token_id=2, head_dim=16,
                              max_position_embeddings=16384, rms_norm_eps=1e-5,
                              rope_theta=273768.0, tie_word_embeddings=False,
                              vocab_size=49155),
            vision_config=dict(TOWER, image_size=384, patch_size=14))
    if name == INTERNVL:
        # transformers' conversion: image_token_id 151667, eos forced to 151645, vision
        # with absolute position embeddings; rope_scaling dynamic x2 of InternVL3's
        # llm_config is UNVERIFIED and left out (it acts only past 32768 positions)
        return dict(
            architectures=["InternVLForConditionalGeneration"], downsample_ratio=0.5,
            image_seq_length=256, image_token_id=151667, model_type="internvl",
            projector_hidden_act="gelu", tie_word_embeddings=False, torch_dtype="float32",
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            text_config=_text(name, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
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
    if name == MISTRAL3:
        # UNVERIFIED: the vision tower's hidden_act ("silu" as in the released config copy
        # found; Pixtral's default is gelu)
        return dict(
            architectures=["Mistral3ForConditionalGeneration"], image_token_index=10,
            model_type="mistral3", multimodal_projector_bias=False,
            projector_hidden_act="gelu", spatial_merge_size=2, tie_word_embeddings=False,
            torch_dtype="float32", vision_feature_layer=-1,
            text_config=_text(name, model_type="mistral", head_dim=SHORT_HEAD_DIM,
                              hidden_act="silu", max_position_embeddings=131072,
                              rms_norm_eps=1e-5, rope_theta=1000000000.0, sliding_window=None,
                              tie_word_embeddings=False, vocab_size=131072),
            vision_config=dict(TOWER, model_type="pixtral", head_dim=16, hidden_act="silu",
                               image_size=1540, num_channels=3, patch_size=14,
                               rope_theta=10000.0))
    if name == PALIGEMMA:
        return dict(
            architectures=["PaliGemmaForConditionalGeneration"], bos_token_id=2,
            eos_token_id=1, image_token_index=257152, model_type="paligemma", pad_token_id=0,
            projection_dim=LM["hidden_size"], torch_dtype="float32",
            tie_word_embeddings=True,
            text_config=_text(name, model_type="gemma2", attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, head_dim=SHORT_HEAD_DIM,
                              hidden_activation="gelu_pytorch_tanh", num_image_tokens=256,
                              query_pre_attn_scalar=SHORT_HEAD_DIM,  # real: 256 = head_dim
                              sliding_window=4096, tie_word_embeddings=True,
                              vocab_size=257216),
            vision_config=dict(TOWER, model_type="siglip_vision_model", image_size=224,
                               num_image_tokens=256, patch_size=14,
                               projection_dim=LM["hidden_size"], vision_use_head=False))
    raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")


def preprocessor_config(name: str) -> dict:
    common = dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                  rescale_factor=RESCALE)
    if name == SMOLVLM:
        return dict(common, do_image_splitting=True, do_pad=True, image_mean=[0.5] * 3,
                    image_processor_type="Idefics3ImageProcessor", image_std=[0.5] * 3,
                    max_image_size={"longest_edge": 384}, processor_class="Idefics3Processor",
                    resample=1, size={"longest_edge": 1536})
    if name == INTERNVL:
        # crop_to_patches is off here and turned on by InternVLProcessor's call defaults
        return dict(common, crop_to_patches=False, image_mean=[0.485, 0.456, 0.406],
                    image_processor_type="GotOcr2ImageProcessorFast",
                    image_std=[0.229, 0.224, 0.225], max_patches=12, min_patches=1,
                    processor_class="InternVLProcessor", resample=3,
                    size={"height": 448, "width": 448})
    if name == MISTRAL3:
        return dict(common, image_mean=CLIP_MEAN, image_processor_type="PixtralImageProcessor",
                    image_std=CLIP_STD, patch_size={"height": 14, "width": 14},
                    processor_class="PixtralProcessor", resample=3,
                    size={"longest_edge": 1540})
    if name == PALIGEMMA:
        return dict(common, do_convert_rgb=None, image_mean=[0.5] * 3,
                    image_processor_type="SiglipImageProcessor", image_seq_length=256,
                    image_std=[0.5] * 3, processor_class="PaliGemmaProcessor", resample=3,
                    size={"height": 224, "width": 224})
    raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")


def processor_config(name: str) -> dict | None:
    if name == SMOLVLM:
        return dict(image_seq_len=81, processor_class="Idefics3Processor")
    if name == INTERNVL:
        return dict(image_seq_length=256, processor_class="InternVLProcessor")
    if name == MISTRAL3:
        return dict(image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
                    image_token="[IMG]", patch_size=14, processor_class="PixtralProcessor",
                    spatial_merge_size=2)
    return None  # PaliGemma ships none


def generation_config(name: str) -> dict:
    """bos / eos / pad ids. UNVERIFIED: SmolVLM-Instruct's eos (<end_of_utterance>, which
    ends every turn of its template) and pad; InternVL3-hf's (eos 151645 as its converted
    text config)."""
    ids = {SMOLVLM: (1, 49154, 2), INTERNVL: (151643, 151645, None), MISTRAL3: (1, 2, 11),
           PALIGEMMA: (2, 1, 0)}[name]
    out = dict(bos_token_id=ids[0], eos_token_id=ids[1])
    if ids[2] is not None:
        out["pad_token_id"] = ids[2]
    return out


# ---- building -----------------------------------------------------------------------------------
def build(name: str, out: Path) -> Path:
    """Write the look-alike of `name` into the (empty or new) directory `out`."""
    template = TEMPLATES[name]
    return write_look_alike(out, model_config(name), {
        "generation_config.json": generation_config(name),
        "preprocessor_config.json": preprocessor_config(name),
        "processor_config.json": processor_config(name),
        "chat_template.json": None if template is None else {"chat_template": template},
    }, tokenizer_files(name))


def fingerprint() -> str:
    """Changes with this file, checkpoints.py (what it borrows) and the libraries."""
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update((Path(__file__).parent / "checkpoints.py").read_bytes())
    for version in (transformers.__version__, tokenizers.__version__, torch.__version__):
        digest.update(version.encode())
    return digest.hexdigest()[:16]


def checkpoint_dir(name: str) -> Path:
    """The cached look-alike of `name`, built first if this source/version has none yet."""
    if name not in NAMES:
        raise ValueError(f"unknown checkpoint {name!r}; choose one of {', '.join(NAMES)}")
    return publish(cache_root() / f"{name}-{fingerprint()}", lambda tmp: build(name, tmp))
