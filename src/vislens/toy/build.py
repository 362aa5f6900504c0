"""Tokenizer, processor and model of the toy LLaVA, all stock `transformers` classes.

Everything here is a plain Hugging Face object so that the saved directory loads
with `AutoModelForImageTextToText` / `AutoProcessor` and every experiment treats
the toy exactly like a real checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vislens.data import shapesworld

TOY_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"

PAD, UNK, BOS, EOS, IMAGE, SEP = "<pad>", "<unk>", "<s>", "</s>", "<image>", "<sep>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE, SEP)

# LLaVA-1.5 order: the image first, then the question; the assistant turn opens
# after <sep>. Text parts are space-separated words (the tokenizer is word level).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% else %}"
    "{{ ' <sep>' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ ' </s>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' <sep>' }}{% endif %}"
)


@dataclass(frozen=True)
class ToySpec:
    """Sizes of the toy; the defaults are what ships (time per CPU step decides them)."""

    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp: int = 256
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_mlp: int = 256

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the ShapesWorld vocabulary (sorted, so ids are stable)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in sorted(shapesworld.vocabulary()):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[IMAGE, SEP], padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(spec: ToySpec | None = None) -> LlavaProcessor:
    """LLaVA processor with the PIL CLIP image processor (no torchvision needed)."""
    spec = spec or ToySpec()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(),
        patch_size=spec.patch_size, vision_feature_select_strategy="default",
        image_token=IMAGE, num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: ToySpec | None = None, seed: int = 0) -> LlavaForConditionalGeneration:
    """Untrained toy LLaVA: CLIP tower (CLS dropped), 2-layer MLP projector, Llama LM."""
    import torch

    spec = spec or ToySpec()
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.lm_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.lm_hidden, intermediate_size=spec.lm_mlp,
        num_hidden_layers=spec.lm_layers, num_attention_heads=spec.lm_heads,
        num_key_value_heads=spec.lm_heads, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", image_seq_length=spec.grid ** 2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.do_sample = False
    return model
