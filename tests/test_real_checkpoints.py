"""Every experiment, `eval` and `study` on the four look-alike checkpoints, proving each path ran.

Random weights almost never answer right, so a run on them keeps no sample and
its conditions never execute. The fixtures here (answer_head.py) are the
look-alikes with ONLY their unembedding fitted, so that greedy decoding answers
the test scenes right when the target is visible and wrong when its pixels are
noised; everything else is the random model. The scenes are 640x480 and 560x420
COCO-format images whose targets have multi-piece names ("gir|af|fe"), so the
experiments run on 576-2929-token sequences of the real geometries.
"""

from __future__ import annotations

import pytest
import torch
from answer_head import LENS_NAMES, TARGETS, answer, fitted_dir, lens_scenes, scenes
from checkpoints import NAMES

import vislens
from vislens.experiments import logit_lens, prompts
from vislens.experiments.accuracy import generate_answers
from vislens.experiments.selection import noise_object


@pytest.fixture(scope="session", params=NAMES)
def fitted(request):
    """(name, loaded VLM) of each look-alike with its fitted unembedding."""
    return request.param, vislens.load(str(fitted_dir(request.param)))


def word_starts(tokenizer, name: str) -> set[int]:
    """The ids that begin each word of `name`, read from the tokenizer's offsets when the
    name is written in a sentence or opens the text: what a model emits for the word."""
    ids = set()
    for text, at in ((f"It is a {name}", len("It is a ")), (name, 0)):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts, pos = set(), at
        for word in name.split():
            starts.add(pos)
            pos += len(word) + 1
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if text[a:b].strip() and any(a <= s < b for s in starts):
                ids.add(int(tok))
    return ids


def test_fitted_fixtures_answer_right_clean_and_wrong_noised(fitted):
    """The construction works: eval's own generator (left-padded batches) says the target on
    every clean scene and misses it on every noised one, in all three settings."""
    name, vlm = fitted
    images, questions, expected = [], [], []
    for idx, sample in enumerate(scenes()):
        noised = noise_object(sample.image, sample.instances[0].mask, seed=idx)
        for setting in ("polling", "vqa", "generative"):
            q = prompts.question(sample, 0, setting)
            for image, is_noised in ((sample.image, False), (noised, True)):
                images.append(image)
                questions.append(q)
                expected.append((setting, is_noised, answer(sample, setting, is_noised)))
    texts = generate_answers(vlm.model, vlm.processor, images, questions,
                             max_new_tokens=prompts.MAX_NEW_TOKENS["generative"])
    for text, q, (setting, is_noised, said) in zip(texts, questions, expected, strict=True):
        assert q.is_correct(text) != is_noised, (name, setting, is_noised, text)
        assert text.strip() == said, (name, setting, text)  # and nothing after the EOS


def test_class_word_ids_are_the_pieces_a_word_starts_with(fitted):
    """The lens counts a hit when a top-k token starts a word of the class name. A
    SentencePiece tokenizer writes " giraffe" as "▁" + "▁g|ir|af|fe": the bare "▁" starts
    no word, and taking it would make every "▁" in a top-5 a hit for every class."""
    name, vlm = fitted
    for cls in (*TARGETS, *LENS_NAMES):
        got = set(logit_lens.word_ids(vlm.tokenizer, cls))
        assert got == word_starts(vlm.tokenizer, cls), (name, cls)
        for i in got:
            assert vlm.tokenizer.decode([i]).strip(), (name, cls, i)


def test_logit_lens_unembeds_a_bounded_number_of_tokens_at_once(fitted, tmp_path):
    """OneVision's 2929 image tokens x a 152k vocabulary are 1.8 GB of float32 logits per
    layer: the lens must decode a bounded slice of tokens at a time, and still give the
    model's own prediction at the last layer."""
    name, vlm = fitted
    sample = lens_scenes()[0]
    sizes = []
    hook = vlm.lm_head.register_forward_hook(
        lambda module, args, out: sizes.append(out.numel()))
    try:
        rows = list(logit_lens._chunk_rows(vlm, [(sample, 0)], logit_lens.LensConfig(viewers=0),
                                           tmp_path, []))
    finally:
        hook.remove()
    assert max(sizes) <= logit_lens.MAX_LOGITS, (name, max(sizes))
    batch = vlm.prepare([sample.image], [logit_lens.PROMPT])
    image = batch.token_map.image_positions(0)
    assert len(rows) == len(image) * (vlm.num_layers + 1)
    picked = image[:: max(1, len(image) // 48)]
    with torch.no_grad():  # the model's own logits, at these positions only
        own = vlm.forward(batch, logits_to_keep=torch.as_tensor(picked)).logits[0]
    top1 = {r["position"]: r["topk_ids"][0] for r in rows if r["layer"] == vlm.num_layers}
    assert [top1[int(p)] for p in picked] == own.argmax(-1).tolist()
