"""The models benchmarked: the toy (CPU), a mid-size random LLaVA (CPU) and a
LLaVA-1.5-7B-shaped random model in bf16 (GPU only).

Random weights are enough: cost does not depend on the values, and every
comparison checks rivals against vislens on the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vislens.models.vlm import VLM

ROOT = Path(__file__).resolve().parent.parent


def toy() -> VLM:
    """The shipped toy when its weights are there, else the untrained toy (same shapes)."""
    from vislens.toy.build import TOY_DIR, build_model, build_processor

    if (TOY_DIR / "config.json").exists():
        from vislens.models.vlm import load

        return load("toy")
    return VLM(build_model().eval(), build_processor(), "llava", name="toy (untrained)")


def _llava(name: str, text: dict, vision: dict, device: str, dtype: torch.dtype) -> VLM:
    """A LlavaForConditionalGeneration with LLaVA-1.5 geometry (CLIP 336/14, 576 tokens)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_models import LLAVA_TEMPLATE, tiny_tokenizer
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **vision),
        text_config=LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                max_position_embeddings=4096, **text),
        image_token_id=image_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    ip = LlavaImageProcessorPil(size={"shortest_edge": 336},
                                crop_size={"height": 336, "width": 336})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return VLM(model, proc, "llava", name=name)


def mid() -> VLM:
    """Mid-size CPU model: LLaVA-1.5 geometry (576 image tokens), Llama d=512 x 6 layers.

    The vocabulary (4,000) is scaled with the width so that one unembedding
    costs what it costs relative to one decoder layer in LLaVA-1.5-7B
    (V / 12d = 32,000 / (12 x 4,096) = 0.65): the logit lens' share of the
    work is then the real model's, which a 32k vocabulary on d=512 would
    overstate eightfold. (d=1024 x 8 layers took ~10 s per forward on this
    shared 2-core CPU: too slow for a sweep timed several times.)
    """
    text = dict(vocab_size=4000, hidden_size=512, intermediate_size=1376,
                num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8)
    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, projection_dim=256)
    return _llava("mid (random, LLaVA-1.5 geometry, Llama d=512 x 6, fp32)", text, vision,
                  "cpu", torch.float32)


def llava7b() -> VLM:
    """LLaVA-1.5-7B shape (CLIP-L/14 336 + Vicuna-7B) with random bf16 weights; needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("llava7b needs a CUDA GPU")
    text = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, projection_dim=768)
    return _llava("LLaVA-1.5-7B shape (random, bf16)", text, vision, "cuda", torch.bfloat16)


BUILDERS = {"toy": toy, "mid": mid, "llava7b": llava7b}
