"""google/paligemma2-3b-mix-224 (model_type `paligemma`): Gemma 2 2B + SigLIP-224/14, 256
tokens, a prefix LM, soft-capped attention and logits; no chat template ("<image>" * n + BOS
+ text + "\\n").

Values are those of public copies of the hub files where they could be found; what could
not be verified is marked UNVERIFIED where it is chosen, with the reason for the choice.
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

NAME = "paligemma2-3b-mix-224"
FAMILY = "paligemma"
KV_HEADS = 2  # real: 4 of 8 (Gemma 2 2B), kept grouped
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
# Gemma 2 has head_dim * heads != hidden (256 * 8 = 2048 of 2304): the look-alike keeps that
# (8 * 4 = 32 of 64)
SHORT_HEAD_DIM = 8
# Gemma: ids 0-4, the turn markers at 106 / 107; where the unused and byte tokens sit
# between them and the merges is UNVERIFIED (it changes no id vislens reads).
GEMMA_HEAD = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]"]
              + [f"<unused{i}>" for i in range(100)] + ["<start_of_turn>", "<end_of_turn>"])
PALIGEMMA_EXTRA = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]


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
    tokens, merges = train_bpe(trainer_tok, alphabet)
    head = GEMMA_HEAD + [f"<0x{b:02X}>" for b in range(256)]
    regular = head + [t for t in tokens if t not in head]
    regular += fillers(len(regular), 256000) + PALIGEMMA_EXTRA
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


def tokenizer_files() -> tuple[object, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) as the checkpoint ships them;
    tokenizer_config keys beyond the special tokens are UNVERIFIED (padding_side left out:
    the default)."""
    tok = gemma_tokenizer()
    special = dict(additional_special_tokens=["<image>"], bos_token="<bos>",
                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    config = dict(special, add_bos_token=True, add_eos_token=False,
                  clean_up_tokenization_spaces=False, model_max_length=HUGE,
                  processor_class="PaliGemmaProcessor", sp_model_kwargs={},
                  spaces_between_special_tokens=False, tokenizer_class="GemmaTokenizer",
                  use_default_system_prompt=False)
    config = {"added_tokens_decoder": added_tokens_decoder(tok), **config}
    return tok, config, special


def model_config() -> dict:
    """config.json with the checkpoint's keys and values; LM and vision tower shrunk (real:
    text 2304 / 9216 / 26 layers / 8 heads, vision 1152 / 4304 / 27 / 16)."""
    return dict(
        architectures=["PaliGemmaForConditionalGeneration"], bos_token_id=2,
        eos_token_id=1, image_token_index=257152, model_type="paligemma", pad_token_id=0,
        projection_dim=LM["hidden_size"], torch_dtype="float32",
        tie_word_embeddings=True,
        text_config=dict(**LM, num_key_value_heads=KV_HEADS, torch_dtype="float32",
                         model_type="gemma2", attn_logit_softcapping=50.0,
                         final_logit_softcapping=30.0, head_dim=SHORT_HEAD_DIM,
                         hidden_activation="gelu_pytorch_tanh", num_image_tokens=256,
                         query_pre_attn_scalar=SHORT_HEAD_DIM,  # real: 256 = head_dim
                         sliding_window=4096, tie_word_embeddings=True,
                         vocab_size=257216),
        vision_config=dict(TOWER, model_type="siglip_vision_model", image_size=224,
                           num_image_tokens=256, patch_size=14,
                           projection_dim=LM["hidden_size"], vision_use_head=False))


def preprocessor_config() -> dict:
    return dict(do_convert_rgb=None, do_normalize=True, do_rescale=True, do_resize=True,
                rescale_factor=RESCALE, image_mean=[0.5] * 3,
                image_processor_type="SiglipImageProcessor", image_seq_length=256,
                image_std=[0.5] * 3, processor_class="PaliGemmaProcessor", resample=3,
                size={"height": 224, "width": 224})


def generation_config() -> dict:
    return dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)


def build(out: Path) -> Path:
    """Write the look-alike into the (empty or new) directory `out`: no processor_config.json
    and no chat template, as released."""
    return write_look_alike(out, model_config(), {
        "generation_config.json": generation_config(),
        "preprocessor_config.json": preprocessor_config(),
    }, tokenizer_files())
