"""google/gemma-3-4b-it (model_type `gemma3`): SigLIP at 896 px / 14, 256 tokens per image
(4x4 average pool), pan-and-scan options left null as released (the processor's defaults
apply: off), a 5:1 sliding/global pattern shrunk to one sliding (window 1024, as released)
and one global layer, tied embeddings, a SentencePiece-kind BPE without a dummy prefix, BOS
written by the chat template, images where the content puts them.

Values are those of public copies of the hub files (config.json, preprocessor_config.json
and generation_config.json; the Gemma 3 conversion script's special-token ids); values not
seen in such a copy are marked UNVERIFIED where they are chosen.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    HUGE,
    LM,
    RESCALE,
    added_tokens_decoder,
    corpus,
    fillers,
    train_bpe,
    write_look_alike,
)

NAME = "gemma-3-4b-it"
FAMILY = "gemma3"
KV_HEADS = 2  # real: 4 of 8, kept grouped
HEAD_DIM = LM["hidden_size"] // LM["num_attention_heads"]  # 16
VISION = dict(hidden_size=32, image_size=896, intermediate_size=64,
              model_type="siglip_vision_model", num_attention_heads=2,
              num_hidden_layers=2, patch_size=14, vision_use_head=False)
HEAD = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"] + \
    [f"<unused{i}>" for i in range(99)] + ["<start_of_turn>", "<end_of_turn>"]
BOI, EOI, IMAGE = 255999, 256000, 262144
REGULAR = 262144  # SentencePiece entries; <image_soft_token> is added after them


def gemma_tokenizer():
    """Gemma kind: BPE over "▁"-joined text WITHOUT a dummy prefix (the first word has no
    "▁"), digits split, byte fallback, BOS prepended by the post-processor; the special ids
    of the release (pad 0, eos 1, bos 2, unk 3, turns 105 / 106, image 255999 / 256000 /
    262144). Where the 256 byte tokens sit is UNVERIFIED (here right after the turn
    markers); fillers that nothing produces pad the vocabulary to its real size."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    norm = normalizers.Replace(" ", "▁")
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = norm
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    alphabet = sorted({ch for line in corpus() for ch in line.replace(" ", "▁")} | {"\n"})
    tokens, merges = train_bpe(trainer_tok, alphabet)
    head = HEAD + [f"<0x{b:02X}>" for b in range(256)]
    regular = head + [t for t in tokens if t not in head]
    regular += fillers(len(regular), BOI)
    regular += ["<start_of_image>", "<end_of_image>"]
    regular += [f"<unused{i}>" for i in range(99, 99 + REGULAR - len(regular))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(regular)}, merges=merges,
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]",
                "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    tok.add_special_tokens([AddedToken("<image_soft_token>", normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)])
    return tok


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the release ships them."""
    tok = gemma_tokenizer()
    images = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>",
                  image_token="<image_soft_token>")
    config = dict(add_bos_token=True, add_eos_token=False, bos_token="<bos>",
                  clean_up_tokenization_spaces=False, eos_token="<eos>",
                  extra_special_tokens=images, model_max_length=HUGE, pad_token="<pad>",
                  padding_side="left", processor_class="Gemma3Processor",
                  sp_model_kwargs=None, spaces_between_special_tokens=False,
                  tokenizer_class="GemmaTokenizer", unk_token="<unk>",
                  use_default_system_prompt=False, **images)
    special = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                   unk_token="<unk>", **images)
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


# Gemma 3: BOS written by the template; a system message becomes a prefix of the first user
# turn; the assistant is "model"; each text item is trimmed; an image is <start_of_image>
# where the content puts it (the processor expands it to "\n\n" + boi + 256 soft tokens +
# eoi + "\n\n").
TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def model_config() -> dict:
    """config.json with the release's keys and values; LM and vision tower shrunk."""
    # The release names few keys (transformers' defaults fill the rest): the real ones
    # are kept, the shrunk sizes written out; layer_types replaces the 5:1 pattern.
    text = dict(hidden_size=LM["hidden_size"], intermediate_size=LM["intermediate_size"],
                model_type="gemma3_text", num_hidden_layers=2,
                num_attention_heads=LM["num_attention_heads"],
                num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                query_pre_attn_scalar=HEAD_DIM,
                layer_types=["sliding_attention", "full_attention"],
                rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024,
                vocab_size=262208)
    return dict(architectures=["Gemma3ForConditionalGeneration"], boi_token_index=BOI,
                eoi_token_index=EOI, eos_token_id=[1, 106],
                image_token_index=IMAGE, initializer_range=0.02,
                mm_tokens_per_image=256, model_type="gemma3", text_config=text,
                torch_dtype="float32", vision_config=dict(VISION))


def preprocessor_config() -> dict:
    return dict(do_convert_rgb=None, do_normalize=True, do_pan_and_scan=None,
                do_rescale=True, do_resize=True, image_mean=[0.5] * 3,
                image_processor_type="Gemma3ImageProcessor", image_seq_length=256,
                image_std=[0.5] * 3, pan_and_scan_max_num_crops=None,
                pan_and_scan_min_crop_size=None, pan_and_scan_min_ratio_to_activate=None,
                processor_class="Gemma3Processor", resample=2, rescale_factor=RESCALE,
                size={"height": 896, "width": 896})


def processor_config() -> dict:
    return dict(image_seq_length=256, processor_class="Gemma3Processor")


def generation_config() -> dict:
    # Token ids only: the release's sampling defaults (top_k 64, top_p 0.95) are left out, as
    # for the paper fixtures; Gemma's "hybrid" cache is kept (transformers maps it to its
    # dynamic sliding-window cache, which knockout must place its columns in).
    return dict(bos_token_id=2, cache_implementation="hybrid", eos_token_id=[1, 106],
                pad_token_id=0)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    config = model_config()

    def prepare(model) -> None:
        import torch

        # Gemma 3 initialises its image projection to zeros (training starts there): a random
        # stand-in needs it random, or no image would ever reach the language model.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(
                0.0, config["initializer_range"])

    return write_look_alike(out, config, {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "processor_config.json": processor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files(), prepare)
