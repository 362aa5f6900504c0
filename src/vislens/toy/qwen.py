"""The second toy, `toy-qwen`: a real Qwen2.5-VL checkpoint small enough for a CPU.

Same ShapesWorld words as the LLaVA toy, but every Qwen2.5-VL mechanism the
experiments must handle is really there: a windowed vision tower with 2x2
patch merging, dynamic resolution (`image_grid_thw`), `<|image_pad|>`
placeholders between `<|vision_start|>` / `<|vision_end|>`, and mRoPE
positions computed by the model's own `get_rope_index`.

Geometry: patch 4 and merge 2 give 8 px per LM image token, so a 96 px scene is
a [1, 24, 24] patch grid and 12 x 12 = 144 image tokens, the LLaVA toy's count.
Other sizes are resized to multiples of 8 px between `MIN_PIXELS` and
`MAX_PIXELS` (the processor's own `smart_resize`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vislens.data import shapesworld

TOY_QWEN_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_qwen"

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD, UNK = "<|image_pad|>", "<|video_pad|>", "<unk>"
SPECIALS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK)
ROLES = ("system", "user", "assistant")

# Qwen2.5-VL's own layout (image before the question). Newlines are kept as in the
# real template; the word-level pre-tokenizer drops them, so ids stay words only.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MIN_PIXELS = 32 * 32  # 4 x 4 patches: the smallest image still gives 2 x 2 tokens
MAX_PIXELS = 192 * 192  # at most 24 x 24 = 576 image tokens
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class QwenToySpec:
    """Sizes of toy-qwen; the defaults are what ships."""

    patch_size: int = 4
    temporal_patch_size: int = 2
    merge_size: int = 2
    window_size: int = 32  # pixels: 4 x 4 LM tokens (8 x 8 patches) per attention window
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    vision_mlp: int = 128
    full_attention_layers: tuple[int, ...] = (2,)
    # the LLaVA toy's LM sizes: training starts from its LM (`vislens.toy.transplant`)
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_mlp: int = 256
    lm_norm_eps: float = 1e-6
    mrope_section: tuple[int, int, int] = (4, 6, 6)  # sums to head_dim / 2 = 16
    tie_word_embeddings: bool = True  # as Qwen2.5-VL-3B; lets answers copy image-token words

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: Qwen's special tokens, chat roles, then ShapesWorld words.

    Same construction as the LLaVA toy's tokenizer (WordLevel over the sorted
    ShapesWorld vocabulary, whitespace pre-tokenizer), with Qwen's specials.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in (*ROLES, *sorted(shapesworld.vocabulary())):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor(spec: QwenToySpec | None = None) -> Qwen2VLImageProcessorPil:
    """The PIL Qwen2-VL image processor (the torchvision one is not needed)."""
    spec = spec or QwenToySpec()
    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )


def build_processor(spec: QwenToySpec | None = None):
    """A `Qwen2_5_VLProcessor`; without torchvision its video part is a stand-in."""
    from vislens.models.novideo import NoVideoProcessor, images_only, torchvision_available

    image_processor = build_image_processor(spec)
    tokenizer = build_tokenizer()
    if torchvision_available():
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
            Qwen2VLVideoProcessor,
        )

        video = Qwen2VLVideoProcessor(
            patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
            temporal_patch_size=image_processor.temporal_patch_size,
        )
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video, chat_template=CHAT_TEMPLATE)
    return images_only(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=NoVideoProcessor(), chat_template=CHAT_TEMPLATE)


def build_config(spec: QwenToySpec | None = None) -> Qwen2_5_VLConfig:
    spec = spec or QwenToySpec()
    head_dim = spec.lm_hidden // spec.lm_heads
    if 2 * sum(spec.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = "
                         f"{head_dim // 2}")
    tok = build_tokenizer()
    ids = tok.get_vocab()
    text = dict(
        vocab_size=len(ids), hidden_size=spec.lm_hidden, intermediate_size=spec.lm_mlp,
        num_hidden_layers=spec.lm_layers, num_attention_heads=spec.lm_heads,
        num_key_value_heads=spec.lm_heads, max_position_embeddings=1024,
        rope_scaling={"type": "mrope", "mrope_section": list(spec.mrope_section)},
        rope_theta=10000.0, rms_norm_eps=spec.lm_norm_eps, bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD], tie_word_embeddings=spec.tie_word_embeddings,
    )
    vision = dict(
        depth=spec.vision_layers, hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp, num_heads=spec.vision_heads,
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
        spatial_merge_size=spec.merge_size, window_size=spec.window_size,
        out_hidden_size=spec.lm_hidden, fullatt_block_indexes=list(spec.full_attention_layers),
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=spec.tie_word_embeddings,
    )


def build_model(spec: QwenToySpec | None = None, seed: int = 0
                ) -> Qwen2_5_VLForConditionalGeneration:
    """Untrained toy-qwen (sdpa attention, greedy generation defaults)."""
    import torch

    config = build_config(spec)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    gen = model.generation_config
    gen.pad_token_id = config.text_config.pad_token_id
    gen.eos_token_id = config.text_config.eos_token_id
    gen.bos_token_id = None
    gen.do_sample = False
    return model


def save(model, processor, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write a complete Hugging Face directory (model, tokenizer, image processor, template).

    Files are written to a temporary sibling and renamed, so a crash never
    leaves half a checkpoint where loaders look.
    """
    import shutil

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.tokenizer.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)
    (tmp / "chat_template.jinja").write_text(processor.chat_template)
    (tmp / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")
    if extra:
        (tmp / "vislens_toy.json").write_text(json.dumps(extra, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load(path: str | Path = TOY_QWEN_DIR):
    """(model, processor) from a toy-qwen directory through vislens' normal loader path."""
    from vislens.models.loading import load_model, load_processor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no toy-qwen checkpoint at {path}; train one with "
                                "`vislens train-toy --family qwen`")
    return load_model(path, "qwen2_5_vl"), load_processor(path, "qwen2_5_vl")
