"""Protocol defects that only real checkpoints show, checked on their look-alikes
(tests/lookalikes/): images-first templates, tokenizer-added BOS, subword answers,
left-padded RoPE keys, several images per prompt."""

import numpy as np
import pytest
import torch
from lookalikes import NEXT, ONEVISION, PAPER
from PIL import Image

from vislens.data import shapesworld
from vislens.data.resolve import open_task
from vislens.data.samples import Question
from vislens.experiments.accuracy import generate_answers
from vislens.experiments.perception import surface
from vislens.experiments.prompts import answer_span
from vislens.interventions import capture
from vislens.models import load, prompting

ENDS = {  # what the assistant turn looks like once the answer prefix is appended
    "llava-1.5-7b-hf": "ASSISTANT: It is",
    "llama3-llava-next-8b-hf": "<|start_header_id|>assistant<|end_header_id|>\n\nIt is",
    "llava-onevision-qwen2-7b-ov-hf": "<|im_start|>assistant\nIt is",
    "Qwen2.5-VL-7B-Instruct": "<|im_start|>assistant\nIt is",
}
BOS = {"llava-1.5-7b-hf": 1, "llama3-llava-next-8b-hf": 128000}
pytestmark = pytest.mark.lookalike


def paper(*slow: str):
    """The paper's four look-alikes (the `checkpoint` fixture), those named `slow` marked
    slow: the test takes over a second on them (OneVision: loading it, and 2929 image
    tokens at 640x480, take that on their own)."""
    return pytest.mark.parametrize("checkpoint", [
        pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in PAPER],
        indirect=True)


@pytest.fixture(scope="module")
def vlms():
    cache = {}

    def get(name, path):
        if name not in cache:
            cache[name] = load(str(path))
        return cache[name]

    return get


@paper(ONEVISION)
def test_prefix_precedes_the_image_tokens(checkpoint, vlms):
    """B3: on the three images-first llava-hf templates the prefix used to land after the
    image; it must come first in the ids on every family."""
    name, path = checkpoint
    vlm = vlms(name, path)
    prefix = "classes : giraffe , traffic light ."
    batch = vlm.prepare([Image.new("RGB", (640, 480))], ["Describe this image."],
                        prefixes=[prefix])
    ids = batch.input_ids[0][batch.attention_mask[0] > 0].tolist()
    first_image = ids.index(vlm.image_token_id)
    prefix_ids = vlm.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    text_before = vlm.tokenizer.decode(ids[:first_image])
    assert "giraffe" in text_before and "traffic light" in text_before
    assert len(prefix_ids) <= first_image
    after = vlm.tokenizer.decode(ids[first_image:])
    assert "giraffe" not in after and "Describe this image." in after


@paper(ONEVISION)
def test_eval_and_experiments_tokenise_alike_with_one_bos(checkpoint, vlms):
    """eval used to tokenise without special tokens (no BOS on LLaVA-1.5 / Llama-3)."""
    name, path = checkpoint
    vlm = vlms(name, path)
    scene = shapesworld.make_scene(1000, 0)
    q = Question("vqa", "What is the object in the center of the image?", "giraffe",
                 answer_prefix="It is")
    text = prompting.render(vlm.processor, q.prompt, answer_prefix=q.answer_prefix)
    assert text.endswith(ENDS[name])
    from_eval = prompting.encode(vlm.processor, [scene.image], [text])["input_ids"][0]
    from_experiments = vlm.prepare([scene.image], [q.prompt], [q.answer_prefix]).input_ids[0]
    assert torch.equal(from_eval, from_experiments.cpu())
    ids = from_eval.tolist()
    if name in BOS:
        assert ids[0] == BOS[name] and ids.count(BOS[name]) == 1
    else:
        assert vlm.tokenizer.bos_token_id is None or vlm.tokenizer.bos_token_id not in ids[:1]
    answers = generate_answers(vlm.model, vlm.processor, [scene.image], [q], 2)
    assert len(answers) == 1  # the eval path runs on the real processor


@paper(ONEVISION)
def test_answer_span_finds_multi_piece_names(checkpoint, vlms):
    name, path = checkpoint
    tok = vlms(name, path).tokenizer
    ids = tok(" a giraffe next to a traffic light.", add_special_tokens=False)["input_ids"]

    def decode(x):
        return tok.decode(x)

    vqa = answer_span(decode, ids, Question("vqa", "", "giraffe"))
    assert vqa is not None and decode(ids[vqa[0]:vqa[1]]).strip() == "giraffe"
    assert vqa[1] - vqa[0] >= 2  # really several pieces, the first one found
    cap = answer_span(decode, ids, Question("generative", "", "traffic light",
                                            target_name="traffic light"))
    assert decode(ids[cap[0]:cap[1]]).strip() == "traffic light" and cap[1] - cap[0] >= 3


@paper(ONEVISION)
def test_keys_are_the_same_alone_and_left_padded(checkpoint, vlms):
    name, path = checkpoint
    vlm = vlms(name, path)
    image = Image.new("RGB", (640, 480), (30, 120, 200))
    alone = vlm.prepare([image], ["What is this?"])
    padded = vlm.prepare([image, image], ["What is this?", "Is there a giraffe or a traffic "
                                                           "light in this image? Answer briefly."])
    assert int((padded.attention_mask[0] == 0).sum()) > 0
    got = []
    for batch in (alone, padded):
        with capture(vlm, [batch.token_map.image_positions(0)[:64]], keys=True,
                     residual=False) as cap:
            vlm.forward(batch, logits_to_keep=1)
        got.append(dict(cap.keys_post))
    for layer in got[0]:
        torch.testing.assert_close(got[0][layer], got[1][layer], rtol=1e-5, atol=1e-5)


@paper(NEXT, ONEVISION)
def test_surface_scores_answer_strings_and_shows_separate_images(checkpoint, vlms):
    """B4: "(A)"-style answers scored by likelihood (equal to an independent one-choice-
    at-a-time reference); multi-image families see the images themselves."""
    name, path = checkpoint
    vlm = vlms(name, path)
    item = open_task("multiple-choice", "shapesworld:1000", 1, kind="fill")[0]
    shown = surface.shown_images(vlm, item)
    if vlm.family.multi_image:
        assert isinstance(shown, list) and len(shown) == len(item.images)
        tm = vlm.prepare([shown], [item.prompt()]).token_map
        assert sorted(set(tm.image.tolist())) == list(range(len(item.images)))
    else:
        assert isinstance(shown, Image.Image)
    scores = surface.choice_scores(vlm, item)
    for c, letter in enumerate(surface.letters(len(item.choices))):
        full = vlm.prepare([shown], [item.prompt()], answer_prefixes=[letter])
        plain = vlm.prepare([shown], [item.prompt()])
        m = full.seq_len - plain.seq_len
        assert m >= 1
        with torch.no_grad():
            logp = torch.log_softmax(vlm.forward(full).logits[0].float(), -1)
        ids = full.input_ids[0]
        ref = sum(float(logp[j - 1, ids[j]]) for j in range(full.seq_len - m, full.seq_len))
        assert scores[c] == pytest.approx(ref, abs=1e-3)
    answers = surface.model_answers(vlm, [item])
    assert answers[0]["mode"] == "answer-likelihood"
    assert answers[0]["choice"] == int(np.argmax(scores))
