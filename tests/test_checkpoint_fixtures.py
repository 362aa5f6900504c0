"""The paper's four look-alike checkpoints (tests/lookalikes/) hold to the fact sheet.

Tests that use them stand in for the real checkpoints only if every fact a
loader or an experiment reads is the real one: classes, config values,
special-token ids, how BOS gets in, the chat format with its quirks, and how
many image tokens a 640x480 image becomes. The expected values below are the
fact sheet's (docs/sources/real-checkpoints.md), written out again
rather than read from the builder, so a slip in the builder fails here.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from lookalikes import LLAVA15, NEXT, ONEVISION, PAPER, QWEN25VL
from PIL import Image

import vislens
from vislens.models.loading import detect_family, load_processor

FAMILY = {LLAVA15: "llava", NEXT: "llava_next", ONEVISION: "llava_onevision",
          QWEN25VL: "qwen2_5_vl"}
MODEL_CLASS = {LLAVA15: "LlavaForConditionalGeneration",
               NEXT: "LlavaNextForConditionalGeneration",
               ONEVISION: "LlavaOnevisionForConditionalGeneration",
               QWEN25VL: "Qwen2_5_VLForConditionalGeneration"}
PROCESSOR_CLASS = {LLAVA15: "LlavaProcessor", NEXT: "LlavaNextProcessor",
                   ONEVISION: "LlavaOnevisionProcessor", QWEN25VL: "Qwen2_5_VLProcessor"}
IMAGE_TOKEN_ID = {LLAVA15: 32000, NEXT: 128256, ONEVISION: 151646, QWEN25VL: 151655}
IMAGE_TOKENS_640x480 = {LLAVA15: 576, NEXT: 2340, ONEVISION: 2929, QWEN25VL: 391}
BOS = {LLAVA15: 1, NEXT: 128000, ONEVISION: None, QWEN25VL: None}

CONFIG = {  # attribute path on the loaded config -> real value
    LLAVA15: {
        "image_token_id": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False, "image_seq_length": 576,
        "multimodal_projector_bias": True, "text_config.vocab_size": 32064,
        "text_config.model_type": "llama", "text_config.max_position_embeddings": 4096,
        "text_config.rms_norm_eps": 1e-5, "text_config.rope_parameters.rope_theta": 10000.0,
        "text_config.hidden_act": "silu", "text_config.bos_token_id": 1,
        "text_config.eos_token_id": 2, "vision_config.model_type": "clip_vision_model",
        "vision_config.image_size": 336, "vision_config.patch_size": 14,
        "vision_config.hidden_act": "quick_gelu",
    },
    NEXT: {
        "image_token_id": 128256, "use_image_newline_parameter": True,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "projector_hidden_act": "gelu", "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "image_seq_length": 576, "multimodal_projector_bias": True,
        "text_config.vocab_size": 128320, "text_config.model_type": "llama",
        "text_config.rope_parameters.rope_theta": 500000.0,
        "text_config.max_position_embeddings": 8192, "text_config.rms_norm_eps": 1e-5,
        "text_config.bos_token_id": 128000, "text_config.eos_token_id": 128009,
        "vision_config.model_type": "clip_vision_model", "vision_config.image_size": 336,
        "vision_config.patch_size": 14,
    },
    ONEVISION: {
        "image_token_id": 151646, "video_token_id": 151647, "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9", "use_image_newline_parameter": True,
        "multimodal_projector_bias": True, "tie_word_embeddings": False,
        "image_grid_pinpoints": [[h, w] for h in (384, 768, 1152, 1536, 1920, 2304)
                                 for w in (384, 768, 1152, 1536, 1920, 2304)],
        "text_config.vocab_size": 152128, "text_config.model_type": "qwen2",
        "text_config.rope_parameters.rope_theta": 1000000.0,
        "text_config.max_position_embeddings": 32768, "text_config.rms_norm_eps": 1e-6,
        "text_config.tie_word_embeddings": False, "text_config.use_sliding_window": False,
        "vision_config.model_type": "siglip_vision_model", "vision_config.image_size": 384,
        "vision_config.patch_size": 14, "vision_config.vision_use_head": False,
        "vision_config.hidden_act": "gelu_pytorch_tanh", "vision_config.layer_norm_eps": 1e-6,
    },
    QWEN25VL: {
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "tie_word_embeddings": False,
        "text_config.vocab_size": 152064, "text_config.model_type": "qwen2_5_vl_text",
        "text_config.bos_token_id": 151643, "text_config.eos_token_id": 151645,
        "text_config.rope_parameters.rope_theta": 1000000.0,
        "text_config.rope_parameters.mrope_section": [2, 3, 3],
        "text_config.max_position_embeddings": 128000, "text_config.rms_norm_eps": 1e-6,
        "text_config.use_sliding_window": False, "vision_config.patch_size": 14,
        "vision_config.temporal_patch_size": 2, "vision_config.spatial_merge_size": 2,
        "vision_config.window_size": 112, "vision_config.hidden_act": "silu",
        "vision_config.tokens_per_second": 2, "vision_config.out_hidden_size": 64,
        "vision_config.fullatt_block_indexes": [1, 3],
    },
}
RAW_CONFIG = {  # keys of the released config.json itself (older layout than 5.x writes)
    LLAVA15: {"image_token_index": 32000, "pad_token_id": 32001, "vocab_size": 32064},
    NEXT: {"image_token_index": 128256},
    ONEVISION: {"image_token_index": 151646, "video_token_index": 151647},
    QWEN25VL: {"image_token_id": 151655, "vocab_size": 152064, "hidden_size": 64,
               "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
}
PREPROCESSOR = {  # attribute -> real value on the loaded image processor
    LLAVA15: {"size.shortest_edge": 336, "crop_size.height": 336, "do_center_crop": True,
              "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073]},
    NEXT: {"size.shortest_edge": 336, "crop_size.height": 336, "do_pad": True,
           "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336],
                                    [336, 1008]]},
    ONEVISION: {"size.height": 384, "size.width": 384, "do_pad": True, "resample": 3,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    # transformers 5 keeps min_pixels / max_pixels as size.shortest_edge / size.longest_edge.
    QWEN25VL: {"size.shortest_edge": 3136, "size.longest_edge": 12845056, "patch_size": 14,
               "temporal_patch_size": 2, "merge_size": 2, "resample": 3,
               "image_std": [0.26862954, 0.26130258, 0.27577711]},
}
SPECIAL_IDS = {
    LLAVA15: {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x00>": 3, "<0xFF>": 258, "<image>": 32000,
              "<pad>": 32001},
    NEXT: {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
           "<|reserved_special_token_0|>": 128002, "<|reserved_special_token_3|>": 128005,
           "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
           "<|reserved_special_token_4|>": 128008, "<|eot_id|>": 128009,
           "<|reserved_special_token_5|>": 128010, "<|reserved_special_token_250|>": 128255,
           "<image>": 128256, "<pad>": 128257},
    ONEVISION: {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<image>": 151646, "<video>": 151647},
    QWEN25VL: {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
               "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647,
               "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
               "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
               "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656},
}
# (len(tokenizer), regular vocabulary, bos, eos, pad)
TOKENIZER = {LLAVA15: (32002, 32000, "<s>", "</s>", "<pad>"),
             NEXT: (128258, 128000, "<|begin_of_text|>", "<|eot_id|>", "<pad>"),
             ONEVISION: (151648, 151643, None, "<|im_end|>", "<|endoftext|>"),
             QWEN25VL: (151657, 151643, None, "<|im_end|>", "<|endoftext|>")}

Q = "What is this?"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
RENDERED = {  # (image first, text first, with system message "SYS.")
    LLAVA15: ("USER: <image>\nWhat is this? ASSISTANT:",
              "USER: <image>\nWhat is this? ASSISTANT:",
              "SYS. USER: <image>\nWhat is this? ASSISTANT:"),
    NEXT: ("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n",
           "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n",
           "<|start_header_id|>system<|end_header_id|>\n\n\nSYS.<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ONEVISION: ("<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
                "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
                "<|im_start|>system\nSYS.<|im_end|>\n"
                "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"),
    QWEN25VL: (QWEN_SYSTEM + f"<|im_start|>user\n{IMG}What is this?<|im_end|>\n"
               "<|im_start|>assistant\n",
               QWEN_SYSTEM + f"<|im_start|>user\nWhat is this?{IMG}<|im_end|>\n"
               "<|im_start|>assistant\n",
               "<|im_start|>system\nSYS.<|im_end|>\n"
               f"<|im_start|>user\n{IMG}What is this?<|im_end|>\n<|im_start|>assistant\n"),
}


def attr(obj, path: str):
    for key in path.split("."):
        obj = obj[key] if isinstance(obj, dict) else getattr(obj, key)
    return obj


def image_640x480() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8))


def user(*content, system: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": list(content)}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages


@pytest.fixture(scope="session")
def processor(checkpoint):
    """The processor the way vislens loads it (AutoProcessor, else its video-less fallback)."""
    name, path = checkpoint
    return load_processor(path, detect_family(path))


@pytest.mark.lookalike
def test_config_holds_the_real_values(checkpoint):
    from transformers import AutoConfig

    name, path = checkpoint
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == [MODEL_CLASS[name]]
    for key, value in RAW_CONFIG[name].items():
        assert raw[key] == value, key
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == FAMILY[name]
    for key, value in CONFIG[name].items():
        assert attr(config, key) == value, key
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 4)
    # Real GQA kept: LLaVA-1.5 (Vicuna) has none, Llama-3 and Qwen2 / Qwen2.5 group heads.
    assert (text.num_key_value_heads == 4) == (name == LLAVA15)
    assert config.dtype == torch.float32


@pytest.mark.lookalike
def test_image_processor_and_processor_settings(checkpoint, processor):
    name, _ = checkpoint
    assert type(processor).__name__ == PROCESSOR_CLASS[name]
    ip = processor.image_processor
    for key, value in PREPROCESSOR[name].items():
        assert json.loads(json.dumps(attr(ip, key))) == value, key  # tuples as lists
    if name in (LLAVA15, NEXT):
        assert processor.patch_size == 14 and processor.num_additional_image_tokens == 1
        assert processor.vision_feature_select_strategy == "default"
    if name == ONEVISION:
        assert processor.num_image_tokens == 729
        assert processor.vision_feature_select_strategy == "full"
        assert processor.vision_aspect_ratio == "anyres_max_9"


@pytest.mark.lookalike
def test_auto_processor_loads_them(checkpoint):
    from transformers import AutoProcessor

    from vislens.models.novideo import torchvision_available

    name, path = checkpoint
    if name in (ONEVISION, QWEN25VL) and not torchvision_available():
        pytest.skip("their AutoProcessor needs torchvision (vislens falls back; tested above)")
    assert type(AutoProcessor.from_pretrained(path)).__name__ == PROCESSOR_CLASS[name]


@pytest.mark.lookalike
def test_tokenizer_kind_and_special_ids(checkpoint, processor):
    name, path = checkpoint
    tok = processor.tokenizer
    size, regular, bos, eos, pad = TOKENIZER[name]
    assert (len(tok), tok.vocab_size) == (size, regular)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
    for token, token_id in SPECIAL_IDS[name].items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
        assert tok.convert_ids_to_tokens(token_id) == token, token
    spec = json.loads((path / "tokenizer.json").read_text())
    model = spec["model"]
    assert model["type"] == "BPE"
    files = json.loads((path / "tokenizer_config.json").read_text())
    hub_class = {LLAVA15: "LlamaTokenizer", NEXT: "PreTrainedTokenizerFast"}
    assert files["tokenizer_class"] == hub_class.get(name, "Qwen2Tokenizer")
    if name == LLAVA15:
        # transformers 5 takes BOS from tokenizer.json's post-processor; the flags are the hub's.
        assert (files["add_bos_token"], files["add_eos_token"], files["legacy"]) == (
            True, False, False)
        assert model["byte_fallback"] is True and model["unk_token"] == "<unk>"
        assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
        assert spec["pre_tokenizer"] is None
        assert spec["post_processor"]["type"] == "TemplateProcessing"
        assert tok.padding_side == "left"
    else:
        pre = spec["pre_tokenizer"]["pretokenizers"]
        assert [p["type"] for p in pre] == ["Split", "ByteLevel"]
        digits = r"\p{N}{1,3}" if name == NEXT else r"\p{N}|"
        assert digits in pre[0]["pattern"]["Regex"]
    text = "Is there a café in this image? 東京 3.14"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


@pytest.mark.lookalike
def test_coco_class_names_come_out_in_pieces(checkpoint, processor):
    tok = processor.tokenizer

    def pieces(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    for name in ("giraffe", "traffic light", "hair drier"):
        assert pieces(name) > 1 and pieces(" " + name) > 1, name
        # In a prompt the name costs more than one token over the prompt without it.
        base = pieces("Is there a in this image?")
        assert pieces(f"Is there a {name} in this image?") - base > 1, name
    # A subword vocabulary, not characters: the prompt words and answers are whole.
    assert pieces("Is there a dog in this image?") == pieces("Is there a in this image?") + 1
    assert pieces(" yes") <= 2 and pieces("Yes") == 1


@pytest.mark.lookalike
def test_chat_template_renders_the_documented_format(checkpoint, processor):
    name, path = checkpoint
    assert (path / "chat_template.json").is_file()
    image, text = {"type": "image"}, {"type": "text", "text": Q}
    render = processor.apply_chat_template
    image_first, text_first, with_system = RENDERED[name]
    assert render(user(image, text), add_generation_prompt=True) == image_first
    assert render(user(text, image), add_generation_prompt=True) == text_first
    assert render(user(image, text, system="SYS."), add_generation_prompt=True) == with_system
    if name == LLAVA15:
        answer = {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}
        turn = "USER: <image>\nWhat is this? ASSISTANT: Yes. "
        assert render(user(image, text) + [answer]) == turn


@pytest.mark.lookalike
def test_image_tokens_and_bos_for_a_640x480_image(checkpoint, processor):
    name, _ = checkpoint
    img = image_640x480()
    rendered = processor.apply_chat_template(user({"type": "image"}, {"type": "text", "text": Q}),
                                             add_generation_prompt=True)
    out = processor(text=rendered, images=img, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids.count(IMAGE_TOKEN_ID[name]) == IMAGE_TOKENS_640x480[name]
    if BOS[name] is None:
        assert ids[0] == processor.tokenizer.convert_tokens_to_ids(
            "<|im_start|>") and 151643 not in ids
    else:
        assert ids[0] == BOS[name] and ids.count(BOS[name]) == 1
    if name == QWEN25VL:
        assert out["image_grid_thw"].tolist() == [[1, 34, 46]]
        assert tuple(out["pixel_values"].shape) == (1564, 1176)
        at = ids.index(151652)
        assert ids[at + 1 + 391] == 151653
    elif name == LLAVA15:
        assert tuple(out["pixel_values"].shape) == (1, 3, 336, 336)
    else:
        side = 336 if name == NEXT else 384
        assert tuple(out["pixel_values"].shape) == (1, 5, 3, side, side)
    # Tokenising through the template gives the same ids: BOS added once, or never.
    content = [{"type": "image", "image": img}, {"type": "text", "text": Q}]
    direct = processor.apply_chat_template(user(*content), add_generation_prompt=True,
                                           tokenize=True, return_dict=True)
    assert list(direct["input_ids"][0]) == ids


@pytest.mark.lookalike
def test_loads_and_runs_through_vislens(checkpoint):
    name, path = checkpoint
    vlm = vislens.load(str(path))
    assert vlm.model_type == FAMILY[name] and type(vlm.model).__name__ == MODEL_CLASS[name]
    assert type(vlm.processor).__name__ == PROCESSOR_CLASS[name]
    assert vlm.num_layers == 2 and vlm.dtype == torch.float32
    assert vlm.image_token_id == IMAGE_TOKEN_ID[name]
    batch = vlm.prepare(image_640x480(), Q)
    tm = batch.token_map
    n = IMAGE_TOKENS_640x480[name]
    assert len(tm.image_positions(0)) + len(tm.newline_positions(0)) == n
    features = vlm.image_embeddings(batch)
    assert tuple(features[0].shape) == (n, 64)
    vocab = vlm.config.text_config.vocab_size
    logits = vlm.forward(batch, logits_to_keep=1).logits
    assert tuple(logits.shape) == (1, 1, vocab) and torch.isfinite(logits).all()


@pytest.mark.lookalike
@pytest.mark.slow  # trains the four tokenizers again
def test_tokenizers_rebuild_identically():
    """The cache key covers everything: a rebuild from this source gives the cached files."""
    from lookalikes import checkpoint_dir, tokenizer_files

    for name in PAPER:
        tok, config, _ = tokenizer_files(name)
        path = checkpoint_dir(name)
        assert json.loads(tok.to_str()) == json.loads((path / "tokenizer.json").read_text())
        assert config == json.loads((path / "tokenizer_config.json").read_text())


def test_cache_builds_once_and_publishes_only_finished_directories(tmp_path, monkeypatch):
    import lookalikes

    calls = []

    def fake_build(name, out):
        calls.append(name)
        (out / "config.json").write_text("{}")
        if name == NEXT:
            raise RuntimeError("interrupted")
        return out

    monkeypatch.setenv("VISLENS_FIXTURE_CACHE", str(tmp_path))
    monkeypatch.setattr(lookalikes, "build", fake_build)
    first = lookalikes.checkpoint_dir(LLAVA15)
    assert lookalikes.checkpoint_dir(LLAVA15) == first and calls == [LLAVA15]
    assert first.parent == tmp_path and \
        first.name == f"{LLAVA15}-{lookalikes.fingerprint(LLAVA15)}"
    with pytest.raises(RuntimeError):
        lookalikes.checkpoint_dir(NEXT)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no half-built leftovers
    with pytest.raises(ValueError, match="unknown checkpoint"):
        lookalikes.checkpoint_dir("llava-2")


def test_each_family_is_keyed_by_its_own_sources(tmp_path, monkeypatch):
    """A family's cache key covers its module and what it imports from the package, nothing
    else: editing one family's builder rebuilds that family (and those built on it) only."""
    import lookalikes

    def stems(name):
        return [p.stem for p in lookalikes.sources(name)]

    assert stems(LLAVA15) == ["common", "llava"]
    assert stems(lookalikes.QWEN2VL) == ["common", "qwen2_5_vl", "qwen2_vl"]
    assert stems(lookalikes.QWEN3VL) == ["common", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
    assert all("__init__" not in stems(n) for n in lookalikes.NAMES)
    # an edit of one family's module moves that family's key, and no other family's
    package = tmp_path / "lookalikes"
    package.mkdir()
    for path in pathlib.Path(lookalikes.__file__).parent.glob("*.py"):
        (package / path.name).write_bytes(path.read_bytes())
    before = {n: lookalikes.fingerprint(n) for n in lookalikes.NAMES}
    monkeypatch.setattr(lookalikes, "__file__", str(package / "__init__.py"))
    assert {n: lookalikes.fingerprint(n) for n in lookalikes.NAMES} == before
    with (package / "llava_next.py").open("a") as f:
        f.write("# edited\n")
    after = {n: lookalikes.fingerprint(n) for n in lookalikes.NAMES}
    assert [n for n in lookalikes.NAMES if after[n] != before[n]] == [NEXT]
