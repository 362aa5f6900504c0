"""toy-qwen: a real Qwen2.5-VL checkpoint (geometry, packing, shipped weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vislens.data import shapesworld
from vislens.toy import qwen

IMAGE_PAD_ID = qwen.build_tokenizer().convert_tokens_to_ids(qwen.IMAGE_PAD)


@pytest.fixture(scope="module")
def built():
    spec = qwen.QwenToySpec(lm_hidden=48, lm_heads=2, lm_mlp=64, lm_layers=2,
                            mrope_section=(4, 4, 4), vision_hidden=32, vision_mlp=32)
    return qwen.build_model(spec, seed=1).eval(), qwen.build_processor(spec)


def _text(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_geometry_96px_is_24x24_patches_and_144_tokens(built):
    _, proc = built
    scene = shapesworld.make_scene(0, 0)
    text = _text(proc, "what color is the circle ?")
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    enc = proc(images=[scene.image], text=[text + " it is"], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 24, 24]]
    assert int((enc["input_ids"] == IMAGE_PAD_ID).sum()) == 144
    assert enc["pixel_values"].shape == (576, 3 * 2 * 4 * 4)


def test_dynamic_resolution_other_sizes(built):
    _, proc = built
    from PIL import Image

    enc = proc(images=[Image.new("RGB", (128, 64))], text=[_text(proc, "describe this image .")],
               return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 16, 32]]
    assert int((enc["input_ids"] == IMAGE_PAD_ID).sum()) == 8 * 16
    big = proc(images=[Image.new("RGB", (400, 400))], text=[_text(proc, "describe this image .")],
               return_tensors="pt")
    assert int((big["input_ids"] == IMAGE_PAD_ID).sum()) <= qwen.MAX_PIXELS // 64


def test_mrope_section_must_fit_head_dim():
    with pytest.raises(ValueError, match="mrope_section"):
        qwen.build_config(qwen.QwenToySpec(mrope_section=(8, 8, 4)))


def test_packed_training_batch_equals_chat_template_sequence(built):
    from vislens.toy.data import make_pool
    from vislens.toy.qwen_data import QwenEncoder, grid_thw, head_positions, patchify

    model, proc = built
    tok = proc.tokenizer
    enc = QwenEncoder(tok, 144, head_positions(model, tok, 144, [1, 24, 24]))
    pool = make_pool(2, seed=5, grid=12, word_id=tok.get_vocab())
    sample = pool.samples[0]
    qs = shapesworld.questions(sample, "vqa", rng=np.random.default_rng(0))
    qs += shapesworld.questions(sample, "polling", rng=np.random.default_rng(0))
    packed = enc.pack([[enc.block(q.prompt, q.answer_prefix, q.answer) for q in qs]])
    pv = patchify(pool.pixels[:1], proc.image_processor)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], pixel_values=pv,
                       image_grid_thw=grid_thw(1, 96, 96, 4),
                       position_ids=packed["position_ids"],
                       attention_mask=packed["attention_mask"]).logits[0]
    at = 148
    for k, q in enumerate(qs):
        text = _text(proc, q.prompt) + f" {q.answer_prefix} {q.answer}<|im_end|>"
        ref = proc(images=[sample.image], text=[text], return_tensors="pt")
        assert torch.allclose(ref["pixel_values"], pv, atol=1e-6)
        block = packed["block"][0] == k
        assert torch.equal(packed["input_ids"][0, block], ref["input_ids"][0, 148:])
        pos, _ = model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                            ref["image_grid_thw"])
        assert torch.equal(packed["position_ids"][:, 0, block], pos[:, 0, 148:])
        with torch.no_grad():
            ref_logits = model(**ref).logits[0, 148:]
        assert torch.allclose(logits[block], ref_logits, atol=1e-4)
        at += int(block.sum())
    assert at == packed["input_ids"].shape[1]


def test_packed_window_attention_equals_sdpa(built):
    from vislens.toy.qwen_attention import packed_vision_attention

    model, proc = built
    images = [shapesworld.make_scene(1, i).image for i in range(2)]
    enc = proc.image_processor(images=images, return_tensors="pt")
    visual = model.model.visual
    with torch.no_grad():
        ref = visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
        with packed_vision_attention(model):
            out = visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
    assert visual.config._attn_implementation == "sdpa"
    assert torch.allclose(out, ref, atol=1e-5)


def test_guides_point_at_question_words_and_target_object(built):
    from vislens.toy.data import make_pool
    from vislens.toy.qwen_data import qa_batch
    from vislens.toy.qwen_train import build_encoder

    model, proc = built
    tok = proc.tokenizer
    enc = build_encoder(model, proc, qwen.QwenToySpec())
    pool = make_pool(3, seed=9, grid=12, word_id=tok.get_vocab())
    batch = qa_batch(pool, np.arange(3), enc, np.random.default_rng(0), settings=("vqa",))
    ids = batch["input_ids"]
    attrs = set(shapesworld.SHAPES) | set(shapesworld.COLORS)
    bi, ti = torch.nonzero(batch["focus"] >= 0, as_tuple=True)
    assert len(bi) == 3 * 2 * 2  # 3 scenes x 2 targets x (shape, color) questions
    for b, t in zip(bi.tolist(), ti.tolist(), strict=True):
        keys = torch.nonzero(batch["keyword"][b, t]).flatten()
        words = tok.convert_ids_to_tokens(ids[b, keys].tolist())
        assert len(words) == 1 and words[0] in attrs and bool((keys < t).all())
        inst = pool.samples[b].instances[int(batch["focus"][b, t])]
        answer = tok.convert_ids_to_tokens([int(batch["labels"][b, t])])[0]
        assert answer in (inst.attributes["shape"], inst.attributes["color"])
        assert words[0] in (inst.attributes["shape"], inst.attributes["color"])
        assert words[0] != answer


# ---- the shipped weights ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    if not (qwen.TOY_QWEN_DIR / "model.safetensors").is_file():
        pytest.fail(f"toy-qwen weights missing at {qwen.TOY_QWEN_DIR}; "
                    "run `vislens train-toy --family qwen`")
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(qwen.TOY_QWEN_DIR).eval()
    _, processor = qwen.load(qwen.TOY_QWEN_DIR)
    return model, processor


def test_shipped_loads_with_auto_classes(shipped):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vislens.models.novideo import torchvision_available

    model, processor = shipped
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert sum(model.config.text_config.rope_parameters["mrope_section"]) * 2 == \
        model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    if torchvision_available():
        assert type(AutoProcessor.from_pretrained(qwen.TOY_QWEN_DIR)).__name__ == \
            "Qwen2_5_VLProcessor"
    else:  # transformers needs torchvision for any Qwen2.5-VL video processor
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(qwen.TOY_QWEN_DIR)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"


def _accuracy(model, processor, samples, settings=("polling", "vqa")):
    from vislens.experiments.accuracy import evaluate

    return evaluate(model, processor, samples, settings=settings, batch_size=16)["accuracy"]


def test_shipped_generates_vocabulary_answers(shipped):
    """Greedy answers are ShapesWorld words that stop at <|im_end|> (the format is learned)."""
    from vislens.experiments.accuracy import generate_answers

    model, processor = shipped
    samples = shapesworld.generate(4, seed=4242)
    qs = [shapesworld.questions(s, "vqa", rng=np.random.default_rng(0))[1] for s in samples]
    answers = generate_answers(model, processor, [s.image for s in samples], qs, 4)
    colors = set(shapesworld.COLORS)
    assert all(len(a.split()) == 1 and a.split()[0] in colors for a in answers), answers


@pytest.mark.slow
def test_shipped_answers_held_out_scenes(shipped):
    """Measured on 150 scenes of another seed: >= 0.95 each (assets/toy_qwen/README.md);
    a small sample gets some slack, chance is 0.5 for polling and ~0.15 for VQA."""
    model, processor = shipped
    samples = shapesworld.generate(24, seed=4242)
    acc = _accuracy(model, processor, samples, settings=("generative", "polling", "vqa"))
    assert min(acc.values()) >= 0.85, acc


@pytest.mark.slow
def test_shipped_fails_without_its_image_tokens(shipped):
    """Zeroing every image token (the vision tower's output) must cost accuracy."""
    model, processor = shipped
    samples = shapesworld.generate(8, seed=4242)
    clean = _accuracy(model, processor, samples, settings=("polling", "vqa"))

    def zero(module, args, output):
        output.pooler_output = torch.zeros_like(output.pooler_output)
        return output

    handle = model.model.visual.register_forward_hook(zero)
    try:
        ablated = _accuracy(model, processor, samples, settings=("polling", "vqa"))
    finally:
        handle.remove()
    assert ablated["vqa"] <= 0.5 and clean["vqa"] - ablated["vqa"] >= 0.3, (clean, ablated)


def test_transplanted_lm_computes_what_the_llava_toy_lm_computes(tmp_path):
    """After `transplant_lm`, toy-qwen's LM on a text (mRoPE with t = h = w) must give the
    donor's hidden states for the same words, twins mapped by role (exact at fp32)."""
    from vislens.toy import build
    from vislens.toy.transplant import TWINS, transplant_lm

    spec = build.ToySpec(lm_hidden=48, lm_heads=2, lm_mlp=64, lm_layers=2, vision_hidden=32,
                         vision_layers=1, vision_heads=2, vision_mlp=32)
    donor = build.build_model(spec, seed=3).eval()
    with torch.no_grad():  # a non-trivial final norm, so the test sees it copied
        donor.model.language_model.norm.weight.uniform_(0.5, 1.5)
    donor.save_pretrained(tmp_path)
    build.build_processor(spec).save_pretrained(tmp_path)
    qspec = qwen.QwenToySpec(lm_hidden=48, lm_heads=2, lm_mlp=64, lm_layers=2,
                             mrope_section=(4, 4, 4), vision_hidden=32, vision_mlp=32)
    model = qwen.build_model(qspec, seed=1).eval()
    tokenizer = qwen.build_tokenizer()
    unmatched = transplant_lm(model, tokenizer, tmp_path)
    assert set(unmatched) == {"system", "user", qwen.VISION_START, qwen.VISION_END,
                              qwen.VIDEO_PAD}
    words = "<|im_start|> what color is the star ? assistant it is a red".split()
    donor_words = [TWINS.get(w, w) for w in words]
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(words)])
    donor_ids = torch.tensor([build.build_tokenizer().convert_tokens_to_ids(donor_words)])
    with torch.no_grad():
        ours = model.model.language_model(input_ids=ids).last_hidden_state
        theirs = donor.model.language_model(input_ids=donor_ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the check is sharp: a model that was not transplanted differs
    fresh = qwen.build_model(qspec, seed=1).eval()
    with torch.no_grad():
        other = fresh.model.language_model(input_ids=ids).last_hidden_state
    assert not torch.allclose(other, theirs, atol=1e-3)


def test_transplant_refuses_a_donor_of_another_size(tmp_path):
    from vislens.toy import build
    from vislens.toy.transplant import transplant_lm

    spec = build.ToySpec(lm_hidden=64, lm_heads=2, lm_mlp=64, lm_layers=2, vision_hidden=32,
                         vision_layers=1, vision_heads=2, vision_mlp=32)
    build.build_model(spec).save_pretrained(tmp_path)
    build.build_processor(spec).save_pretrained(tmp_path)
    qspec = qwen.QwenToySpec(lm_hidden=48, lm_heads=2, lm_mlp=64, lm_layers=2,
                             mrope_section=(4, 4, 4), vision_hidden=32, vision_mlp=32)
    with pytest.raises(ValueError, match="donor's LM sizes"):
        transplant_lm(qwen.build_model(qspec), qwen.build_tokenizer(), tmp_path)
    with pytest.raises(FileNotFoundError, match="LLaVA toy"):
        transplant_lm(qwen.build_model(qspec), qwen.build_tokenizer(), tmp_path / "nope")
