"""llava-hf/llava-1.5-7b-hf (model_type `llava`): Vicuna-7B (Llama 2, no GQA) + CLIP
ViT-L/14-336, one 336-px center crop -> 576 tokens, a SentencePiece tokenizer with byte
fallback, "USER: <image>\\n... ASSISTANT:" prompts. Facts: docs/sources/real-checkpoints.md."""

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
    corpus,
    fillers,
    train_bpe,
    write_look_alike,
)

NAME = "llava-1.5-7b-hf"
FAMILY = "llava"
KV_HEADS = 4  # real: 32 of 32 (no GQA)


def sentencepiece_tokenizer():
    """Llama-2 kind: BPE over "▁"-joined text, byte fallback, ids 0-2 then 256 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = norm
    # Training splits at "▁" so no piece spans two words, as SentencePiece guarantees.
    # Digits stay single and punctuation stays apart, as in the Llama vocabulary.
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    alphabet = sorted({ch for line in corpus() for ch in "▁" + line.replace(" ", "▁")})
    tokens, merges = train_bpe(trainer_tok, alphabet)
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    regular = head + [t for t in tokens if t not in head]
    regular += fillers(len(regular), 32000)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(regular)}, merges=merges,
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<image>", "<pad>"])
    return tok


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them."""
    tok = sentencepiece_tokenizer()
    config = dict(add_bos_token=True, add_eos_token=False, bos_token="<s>",
                  clean_up_tokenization_spaces=False, eos_token="</s>", legacy=False,
                  model_max_length=HUGE, pad_token="<pad>", padding_side="left",
                  processor_class="LlavaProcessor", sp_model_kwargs={},
                  tokenizer_class="LlamaTokenizer", unk_token="<unk>",
                  use_default_system_prompt=False)
    special = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


# the chat template, written from the documented format
TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ item['text'] + ' ' }}{% endgeneration %}"
    "{%- else -%}{{ item['text'] + ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def model_config() -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk."""
    return dict(
        architectures=["LlavaForConditionalGeneration"], ignore_index=-100,
        image_token_index=32000, model_type="llava", pad_token_id=32001,
        projector_hidden_act="gelu",
        text_config=dict(model_type="llama", **LM, num_key_value_heads=KV_HEADS,
                         torch_dtype="float32", architectures=["LlamaForCausalLM"],
                         max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064),
        tie_word_embeddings=False, torch_dtype="float32", vision_config=dict(CLIP),
        vision_feature_layer=-2, vision_feature_select_strategy="default", vocab_size=32064)


def preprocessor_config() -> dict:
    return dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, rescale_factor=RESCALE,
                crop_size={"height": 336, "width": 336}, do_center_crop=True,
                size={"shortest_edge": 336}, image_processor_type="CLIPImageProcessor",
                processor_class="LlavaProcessor")


def processor_config() -> dict:
    return dict(image_token="<image>", num_additional_image_tokens=1, patch_size=14,
                processor_class="LlavaProcessor", vision_feature_select_strategy="default")


def generation_config() -> dict:
    return dict(bos_token_id=1, eos_token_id=2, pad_token_id=32001)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
        "processor_config.json": processor_config(),
        "chat_template.json": {"chat_template": TEMPLATE},
    }, tokenizer_files())
